use super::*;

fn fingerprint(byte: u8) -> Fingerprint {
    Fingerprint([byte; 32])
}

#[test]
fn partial_block_not_hashed() {
    let namespace = Namespace::new(&fingerprint(1), "t", None);
    let tokens: Vec<u32> = (0..130).collect();
    assert_eq!(block_hashes(&namespace, &tokens, 64).len(), 2);
}

#[test]
fn shared_prefix_shares_hashes() {
    let namespace = Namespace::new(&fingerprint(1), "t", None);
    let a: Vec<u32> = (0..256).collect();
    let mut b = a.clone();
    b[200] = 9999;
    let ha = block_hashes(&namespace, &a, 64);
    let hb = block_hashes(&namespace, &b, 64);
    assert_eq!(ha[..3], hb[..3]);
    assert_ne!(ha[3], hb[3]);
}

#[test]
fn namespace_separates_tenant_salt_and_model() {
    let tokens: Vec<u32> = (0..64).collect();
    let base = block_hashes(&Namespace::new(&fingerprint(1), "a", None), &tokens, 64);
    let other_tenant = block_hashes(&Namespace::new(&fingerprint(1), "b", None), &tokens, 64);
    let salted = block_hashes(&Namespace::new(&fingerprint(1), "a", Some("")), &tokens, 64);
    let other_model = block_hashes(&Namespace::new(&fingerprint(2), "a", None), &tokens, 64);
    assert_ne!(base, other_tenant);
    assert_ne!(base, salted);
    assert_ne!(base, other_model);
}

#[test]
fn tenant_and_salt_boundaries_unambiguous() {
    let a = Namespace::new(&fingerprint(1), "ab", Some("c"));
    let b = Namespace::new(&fingerprint(1), "a", Some("bc"));
    assert_ne!(a, b);
}

#[test]
fn sequence_id_depends_on_length() {
    let namespace = Namespace::new(&fingerprint(1), "t", None);
    assert_ne!(sequence_id(&namespace, &[1, 2]), sequence_id(&namespace, &[1, 2, 0]));
}

#[test]
fn common_prefix_counts_equal_leading_tokens() {
    assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
    assert_eq!(common_prefix(&[], &[1]), 0);
    assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
}

#[test]
fn digest_hex_round_trip() {
    let digest = Digest([7; 32]);
    assert_eq!(Digest::from_hex(&digest.to_hex()), Some(digest));
    assert_eq!(Digest::from_hex("zz"), None);
}

#[test]
fn block_hash_is_keyed_by_parent() {
    let namespace = Namespace::new(&fingerprint(1), "t", None);
    let tokens: Vec<u32> = (0..128).map(|i| i * 0x0102_0304).collect();
    let hashes = block_hashes(&namespace, &tokens, 64);
    let bytes = |block: &[u32]| block.iter().flat_map(|id| id.to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(hashes[0].0, *blake3::keyed_hash(&namespace.0.0, &bytes(&tokens[..64])).as_bytes());
    assert_eq!(hashes[1].0, *blake3::keyed_hash(&hashes[0].0, &bytes(&tokens[64..])).as_bytes());
}

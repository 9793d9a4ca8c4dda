//! Prefix identification: token ids split into fixed-size blocks, each block hashed with BLAKE3
//! keyed by its parent's hash, starting from a namespace key.
//!
//! The namespace key binds the model fingerprint, the tenant and the optional cache salt, so two
//! requests share cache entries only when the engine computes the same KV for them and both
//! belong to the same tenant and salt.

use std::fmt;

use crate::engine::Fingerprint;

/// Domain-separation context of namespace keys.
const NAMESPACE_CONTEXT: &str = "kvsidecar prefix namespace v1";

/// A 32-byte BLAKE3 digest used as a namespace key, block hash or snapshot id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Digest> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Digest(bytes))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        bytes.try_into().ok().map(Digest)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The root of a hash chain: which model, tenant and salt a prefix belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Namespace(pub Digest);

impl Namespace {
    /// Derives the namespace key. Each part is length-prefixed so that no two different
    /// (tenant, salt) pairs give the same byte string.
    pub fn new(fingerprint: &Fingerprint, tenant: &str, cache_salt: Option<&str>) -> Namespace {
        let mut hasher = blake3::Hasher::new_derive_key(NAMESPACE_CONTEXT);
        hasher.update(&fingerprint.0);
        hasher.update(&(tenant.len() as u64).to_le_bytes());
        hasher.update(tenant.as_bytes());
        match cache_salt {
            None => {
                hasher.update(&[0]);
            }
            Some(salt) => {
                hasher.update(&[1]);
                hasher.update(&(salt.len() as u64).to_le_bytes());
                hasher.update(salt.as_bytes());
            }
        }
        Namespace(Digest(*hasher.finalize().as_bytes()))
    }
}

/// Returns the chained hash of every full block of `tokens`; a trailing partial block is not
/// hashed. Block `i` is hashed by BLAKE3 in keyed mode, keyed by the hash of block `i-1` (the
/// namespace key for `i = 0`), over its ids as 4 little-endian bytes each.
///
/// Keying by the parent instead of hashing `parent || ids` saves one BLAKE3 compression per
/// block (a 64-token block is 256 bytes, four compressions), and on little-endian machines the
/// ids are hashed in place. A collision could only cost a cache miss, never wrong KV: the engine
/// reuses a restored slot's KV only for the tokens it compares equal to the prompt.
pub fn block_hashes(namespace: &Namespace, tokens: &[u32], block_tokens: usize) -> Vec<Digest> {
    let mut parent = namespace.0;
    let mut hashes = Vec::with_capacity(tokens.len() / block_tokens.max(1));
    let mut scratch = Vec::new();
    for block in tokens.chunks_exact(block_tokens.max(1)) {
        parent = Digest(*blake3::keyed_hash(&parent.0, little_endian(block, &mut scratch)).as_bytes());
        hashes.push(parent);
    }
    hashes
}

/// Returns the bytes of `ids` as 4 little-endian bytes each: the ids' own memory on a
/// little-endian machine, else a copy in `scratch`.
fn little_endian<'a>(ids: &'a [u32], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    if cfg!(target_endian = "little") {
        zerocopy::IntoBytes::as_bytes(ids)
    } else {
        scratch.clear();
        scratch.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
        scratch
    }
}

/// Returns the id of the snapshot of exactly `tokens` in `namespace`: a hash of the namespace key,
/// the token count and every token id.
pub fn sequence_id(namespace: &Namespace, tokens: &[u32]) -> Digest {
    let mut hasher = blake3::Hasher::new_derive_key("kvsidecar snapshot id v1");
    hasher.update(&namespace.0.0);
    hasher.update(&(tokens.len() as u64).to_le_bytes());
    let mut scratch = Vec::new();
    for part in tokens.chunks(4096) {
        hasher.update(little_endian(part, &mut scratch));
    }
    Digest(*hasher.finalize().as_bytes())
}

/// Returns the length of the longest common prefix of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests;

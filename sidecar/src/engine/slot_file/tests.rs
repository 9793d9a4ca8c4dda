use super::*;

/// Builds a slot file the way llama-server writes one: marked token section, one stream,
/// non-transposed V, `layers` layers of f16 rows of `row` bytes.
pub fn build(tokens: &[u32], layers: u32, row: u64) -> Vec<u8> {
    let mut words: Vec<u32> = vec![u32::MAX, 1, tokens.len() as u32];
    words.extend_from_slice(tokens);
    words.push(0);
    let mut out = Vec::new();
    for word in [MAGIC, VERSION, words.len() as u32] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    for word in &words {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for position in 0..tokens.len() as i32 {
        out.extend_from_slice(&position.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&layers.to_le_bytes());
    for _ in 0..2 {
        for layer in 0..layers {
            out.extend_from_slice(&1i32.to_le_bytes());
            out.extend_from_slice(&row.to_le_bytes());
            out.extend(std::iter::repeat_n(layer as u8, (row * tokens.len() as u64) as usize));
        }
    }
    out
}

#[test]
fn marked_token_section_parsed() {
    let file = build(&[1, 5, 9], 2, 16);
    let summary = parse(file.as_slice()).unwrap();
    assert_eq!(summary.tokens, vec![1, 5, 9]);
    assert_eq!(summary.cells, 3);
    assert_eq!(summary.len, file.len() as u64);
    let layout = summary.layout.unwrap();
    assert_eq!(layout.keys.len(), 2);
    assert_eq!(layout.values[1], RowLayout { ggml_type: 1, row_bytes: 16 });
    assert!(!layout.v_transposed);
}

#[test]
fn plain_token_section_parsed() {
    let mut file = Vec::new();
    for word in [MAGIC, VERSION, 2, 7, 8, 1, 0] {
        file.extend_from_slice(&word.to_le_bytes());
    }
    let summary = parse(file.as_slice()).unwrap();
    assert_eq!(summary.tokens, vec![7, 8]);
    assert_eq!(summary.layout, None);
}

#[test]
fn truncated_file_rejected() {
    let file = build(&[1, 2, 3, 4], 2, 32);
    for cut in [3, 20, file.len() / 2, file.len() - 1] {
        let error = parse(&file[..cut]).unwrap_err();
        assert!(matches!(error, SlotFileError::Truncated { .. }), "cut at {cut}: {error}");
    }
}

#[test]
fn trailing_bytes_rejected() {
    let mut file = build(&[1, 2], 1, 8);
    file.push(0);
    assert!(matches!(parse(file.as_slice()), Err(SlotFileError::Trailing { extra: 1 })));
}

#[test]
fn wrong_magic_and_version_rejected() {
    let mut file = build(&[1], 1, 8);
    file[0] ^= 1;
    assert!(matches!(parse(file.as_slice()), Err(SlotFileError::Magic { .. })));
    let mut file = build(&[1], 1, 8);
    file[4] = 2;
    assert!(matches!(parse(file.as_slice()), Err(SlotFileError::Version { found: 2 })));
}

#[test]
fn huge_counts_rejected_without_allocation() {
    let mut file = Vec::new();
    for word in [MAGIC, VERSION, u32::MAX] {
        file.extend_from_slice(&word.to_le_bytes());
    }
    assert!(matches!(parse(file.as_slice()), Err(SlotFileError::Truncated { .. })));
}

#[test]
fn damaged_files_never_panic() {
    let file = build(&[3, 1, 4, 1, 5], 2, 8);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..5000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut damaged = file.clone();
        let position = (state as usize) % damaged.len();
        damaged[position] = (state >> 32) as u8;
        let cut = ((state >> 40) as usize) % (damaged.len() + 1);
        // Any outcome is fine except a panic or an accepted file that does not add up.
        if let Ok(summary) = parse(&damaged[..cut]) {
            assert_eq!(summary.len, cut as u64);
        }
    }
}

//! Parsing of llama.cpp's sequence-state ("slot") files: the token ids they hold and the layout of
//! their KV data, checked against the file's length so that a truncated file is rejected.
//!
//! The format, all little-endian, as written by llama.cpp's `llama_state_seq_save_file` (state
//! version 3) and its server:
//!
//! ```text
//! u32 magic 0x67677371 ("ggsq"), u32 version 3, u32 n_words, n_words x u32 token section
//! token section: either the plain token ids, or
//!     i32 -1 (marker), u32 1 (state version), u32 n_tokens, n_tokens x i32 ids,
//!     u32 n_media (0 for text), zero padding to a 4-byte boundary
//! KV data: u32 n_stream, then per stream: u32 cell_count, and when cell_count > 0:
//!     cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq_id)
//!     u32 v_trans, u32 n_layer,
//!     n_layer x (i32 k_type, u64 k_row_size, cell_count x k_row_size bytes)
//!     v_trans = 0: n_layer x (i32 v_type, u64 v_row_size, cell_count x v_row_size bytes)
//!     v_trans = 1: n_layer x (i32 v_type, u32 v_element_size, u32 n_embd_v_gqa,
//!                             n_embd_v_gqa x cell_count x v_element_size bytes)
//! ```

use std::io::{self, Read};

/// Magic number at the start of every slot file ("ggsq").
pub const MAGIC: u32 = 0x6767_7371;
/// The only state version this parser accepts.
pub const VERSION: u32 = 3;

const TOKEN_STATE_MARKER: i32 = -1;
const TOKEN_STATE_VERSION: u32 = 1;

/// Reason a slot file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SlotFileError {
    #[error("failed to read slot file: {0}")]
    Io(#[from] io::Error),
    #[error("not a slot file: magic {found:#010x}, expected {MAGIC:#010x}")]
    Magic { found: u32 },
    #[error("unsupported slot file version {found}, expected {VERSION}")]
    Version { found: u32 },
    #[error("slot file truncated: {context} needs {needed} more bytes")]
    Truncated { context: &'static str, needed: u64 },
    #[error("slot file has {extra} bytes after the end of its KV data")]
    Trailing { extra: u64 },
    #[error("invalid slot file: {0}")]
    Invalid(String),
}

/// Shape of one layer's K or V rows in a slot file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowLayout {
    /// ggml type id (1 = f16, 8 = q8_0, ...).
    pub ggml_type: i32,
    /// Bytes per token of this layer's K or V row (for transposed V: element size x width).
    pub row_bytes: u64,
}

/// KV layout of a slot file: everything that must match for the engine to accept a restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvLayout {
    pub n_stream: u32,
    pub v_transposed: bool,
    pub keys: Vec<RowLayout>,
    pub values: Vec<RowLayout>,
}

/// Contents of a slot file, without its KV bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFileSummary {
    /// The token ids whose KV the file holds, in order.
    pub tokens: Vec<u32>,
    /// Number of KV cells stored; equals the token count for a text-only slot.
    pub cells: u32,
    /// None when the file contains no cells (an empty slot).
    pub layout: Option<KvLayout>,
    /// Total file length in bytes.
    pub len: u64,
}

/// Reads a slot file from `reader` and checks that its structure accounts for every byte.
pub fn parse(reader: impl Read) -> Result<SlotFileSummary, SlotFileError> {
    let mut r = Counter { inner: reader, offset: 0 };

    let magic = r.u32("magic")?;
    if magic != MAGIC {
        return Err(SlotFileError::Magic { found: magic });
    }
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(SlotFileError::Version { found: version });
    }

    let n_words = r.u32("token section length")?;
    let mut words = Vec::with_capacity(n_words.min(1 << 20) as usize);
    for _ in 0..n_words {
        words.push(r.u32("token section")?);
    }
    let tokens = decode_token_section(&words)?;

    let n_stream = r.u32("stream count")?;
    if n_stream == 0 || n_stream > 4096 {
        return Err(SlotFileError::Invalid(format!("stream count {n_stream} is out of range")));
    }
    let mut cells_total = 0u32;
    let mut layout = None;
    for _ in 0..n_stream {
        let cell_count = r.u32("cell count")?;
        if cell_count == 0 {
            continue;
        }
        cells_total = cells_total.saturating_add(cell_count);
        for _ in 0..cell_count {
            r.skip(4, "cell position")?;
            let n_seq = r.u32("cell sequence count")?;
            if n_seq > 4096 {
                return Err(SlotFileError::Invalid(format!("cell sequence count {n_seq} is out of range")));
            }
            r.skip(4 * u64::from(n_seq), "cell sequence ids")?;
        }
        let stream_layout = read_kv_data(&mut r, n_stream, cell_count)?;
        match &layout {
            None => layout = Some(stream_layout),
            Some(first) if *first != stream_layout => {
                return Err(SlotFileError::Invalid("streams have different KV layouts".into()));
            }
            Some(_) => {}
        }
    }

    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest)? != 0 {
        let extra = 1 + io::copy(&mut r.inner, &mut io::sink())?;
        return Err(SlotFileError::Trailing { extra });
    }
    Ok(SlotFileSummary { tokens, cells: cells_total, layout, len: r.offset })
}

fn decode_token_section(words: &[u32]) -> Result<Vec<u32>, SlotFileError> {
    if words.first().map(|word| *word as i32) != Some(TOKEN_STATE_MARKER) {
        return Ok(words.to_vec());
    }
    let invalid = |what: &str| SlotFileError::Invalid(format!("token section: {what}"));
    let version = *words.get(1).ok_or_else(|| invalid("missing state version"))?;
    if version != TOKEN_STATE_VERSION {
        return Err(invalid(&format!("unsupported token state version {version}")));
    }
    let count = *words.get(2).ok_or_else(|| invalid("missing token count"))? as usize;
    let ids = words.get(3..3 + count).ok_or_else(|| invalid("token count exceeds the section"))?;
    let n_media = *words.get(3 + count).ok_or_else(|| invalid("missing media count"))?;
    if n_media != 0 {
        return Err(invalid("media chunks are not supported"));
    }
    if words.len() > 4 + count && words[4 + count..].iter().any(|word| *word != 0) {
        return Err(invalid("trailing data"));
    }
    Ok(ids.to_vec())
}

fn read_kv_data<R: Read>(r: &mut Counter<R>, n_stream: u32, cells: u32) -> Result<KvLayout, SlotFileError> {
    let v_trans = r.u32("v_trans flag")?;
    if v_trans > 1 {
        return Err(SlotFileError::Invalid(format!("v_trans flag {v_trans} is not 0 or 1")));
    }
    let n_layer = r.u32("layer count")?;
    if n_layer == 0 || n_layer > 4096 {
        return Err(SlotFileError::Invalid(format!("layer count {n_layer} is out of range")));
    }
    let cells = u64::from(cells);

    let mut keys = Vec::with_capacity(n_layer as usize);
    for _ in 0..n_layer {
        let ggml_type = r.i32("key type")?;
        let row_bytes = r.u64("key row size")?;
        r.skip(checked_len(row_bytes, cells)?, "key rows")?;
        keys.push(RowLayout { ggml_type, row_bytes });
    }

    let mut values = Vec::with_capacity(n_layer as usize);
    for _ in 0..n_layer {
        let ggml_type = r.i32("value type")?;
        let row_bytes = if v_trans == 0 {
            r.u64("value row size")?
        } else {
            let element = u64::from(r.u32("value element size")?);
            let width = u64::from(r.u32("value width")?);
            element.checked_mul(width).ok_or_else(|| SlotFileError::Invalid("value row size overflows".into()))?
        };
        r.skip(checked_len(row_bytes, cells)?, "value rows")?;
        values.push(RowLayout { ggml_type, row_bytes });
    }
    Ok(KvLayout { n_stream, v_transposed: v_trans == 1, keys, values })
}

fn checked_len(row_bytes: u64, cells: u64) -> Result<u64, SlotFileError> {
    row_bytes.checked_mul(cells).ok_or_else(|| SlotFileError::Invalid("row size overflows".into()))
}

/// A reader that counts its offset and names the field a short read stopped in.
struct Counter<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Counter<R> {
    fn bytes<const N: usize>(&mut self, context: &'static str) -> Result<[u8; N], SlotFileError> {
        let mut buffer = [0u8; N];
        let mut filled = 0;
        while filled < N {
            match self.inner.read(&mut buffer[filled..]) {
                Ok(0) => return Err(SlotFileError::Truncated { context, needed: (N - filled) as u64 }),
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
        self.offset += N as u64;
        Ok(buffer)
    }

    fn u32(&mut self, context: &'static str) -> Result<u32, SlotFileError> {
        self.bytes::<4>(context).map(u32::from_le_bytes)
    }

    fn i32(&mut self, context: &'static str) -> Result<i32, SlotFileError> {
        self.bytes::<4>(context).map(i32::from_le_bytes)
    }

    fn u64(&mut self, context: &'static str) -> Result<u64, SlotFileError> {
        self.bytes::<8>(context).map(u64::from_le_bytes)
    }

    fn skip(&mut self, len: u64, context: &'static str) -> Result<(), SlotFileError> {
        let copied = io::copy(&mut (&mut self.inner).take(len), &mut io::sink())?;
        self.offset += copied;
        if copied < len {
            return Err(SlotFileError::Truncated { context, needed: len - copied });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! Snapshot store write and read throughput against raw sequential I/O of the same bytes on the
//! same disk. The raw figures write and read one file with `O_DIRECT` in 1 MiB requests, with an
//! fsync after the write. The store figures insert a 256 MiB slot file (from the page cache) into
//! the RocksDB store, and read it back with its BLAKE3 verification into a sink that drops the
//! bytes. The page cache is dropped before each read, so reads come from the disk.
//!
//! Run with `scripts/bench.sh store` (as root, which dropping the page cache needs).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvsidecar::config::{self, Overrides};
use kvsidecar::prefix::Digest;
use kvsidecar::store::{NewSnapshot, Store};
use kvsidecar_benches::client::median;

const SIZE: usize = 256 << 20;
const REQUEST: usize = 1 << 20;
const RUNS: usize = 3;

/// A buffer aligned for `O_DIRECT`.
struct Aligned {
    pointer: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(size: usize) -> Aligned {
        let layout = Layout::from_size_align(size, 4096).expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { alloc_zeroed(layout) };
        assert!(!pointer.is_null(), "allocation failed");
        Aligned { pointer, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the pointer is valid for `layout.size()` bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts_mut(self.pointer, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.pointer, self.layout) }
    }
}

/// Drops the page cache, so the next read comes from the disk.
fn drop_page_cache() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache (run as root)")
}

fn raw_write(path: &Path, data: &[u8]) -> Result<Duration> {
    let mut buffer = Aligned::new(REQUEST);
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path)?;
    let started = Instant::now();
    for part in data.chunks(REQUEST) {
        buffer.bytes()[..part.len()].copy_from_slice(part);
        file.write_all(&buffer.bytes()[..part.len()])?;
    }
    file.sync_all()?;
    Ok(started.elapsed())
}

fn raw_read(path: &Path) -> Result<Duration> {
    let mut buffer = Aligned::new(REQUEST);
    let mut file = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let started = Instant::now();
    let mut total = 0;
    loop {
        let read = file.read(buffer.bytes())?;
        if read == 0 {
            break;
        }
        total += read;
    }
    anyhow::ensure!(total == SIZE, "read {total} of {SIZE} bytes");
    Ok(started.elapsed())
}

fn open_store(data_dir: &Path) -> Result<Store> {
    let variables = [
        ("KVSIDECAR_STORE_DATA_DIR", data_dir.display().to_string()),
        ("KVSIDECAR_STORE_CAPACITY", "4GiB".to_string()),
        ("KVSIDECAR_STORE_MAX_SNAPSHOT", "1GiB".to_string()),
    ];
    let settings = config::load(&Overrides::default(), variables.into_iter().map(|(key, value)| (key.to_string(), value))).map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok(Store::open(&settings.store)?)
}

fn main() -> Result<()> {
    let work = tempfile::tempdir_in(std::env::var("KVSIDECAR_CACHE").unwrap_or_else(|_| "/tmp".into()))?;
    // Bytes that compress poorly, like KV values.
    let data: Vec<u8> = (0..SIZE as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
    let source = work.path().join("slot.bin");
    std::fs::write(&source, &data)?;
    let raw = work.path().join("raw.bin");

    let (mut raw_writes, mut raw_reads, mut store_writes, mut store_reads) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let rate = |elapsed: Duration| SIZE as f64 / elapsed.as_secs_f64() / 1e6;
    for run in 0..RUNS {
        raw_writes.push(rate(raw_write(&raw, &data)?));
        drop_page_cache()?;
        raw_reads.push(rate(raw_read(&raw)?));

        let store = open_store(&work.path().join(format!("store-{run}")))?;
        let new = NewSnapshot {
            id: Digest([run as u8 + 1; 32]),
            namespace: Digest([9; 32]),
            fingerprint: "benchmark".into(),
            tenant: "default".into(),
            tokens: vec![0; 4096],
            block_hashes: vec![Digest([7; 32])],
            block_tokens: 64,
        };
        // The source file is in the page cache, as a slot file the engine just wrote is.
        std::fs::read(&source)?;
        let started = Instant::now();
        store.insert(&new, &source)?.context("the snapshot was already stored")?;
        store_writes.push(rate(started.elapsed()));
        drop_page_cache()?;
        let started = Instant::now();
        store.read_chunks(&new.id, |_| Ok(()))?;
        store_reads.push(rate(started.elapsed()));
        eprintln!("run {run}: raw write {:.0}, raw read {:.0}, store write {:.0}, store read {:.0} MB/s", raw_writes[run], raw_reads[run], store_writes[run], store_reads[run]);
    }

    let (raw_write, raw_read) = (median(&mut raw_writes), median(&mut raw_reads));
    let (store_write, store_read) = (median(&mut store_writes), median(&mut store_reads));
    println!("{} MiB snapshot, median of {RUNS} runs, MB/s", SIZE >> 20);
    println!("| direction | raw O_DIRECT | store | store / raw |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| write (with fsync) | {raw_write:.0} | {store_write:.0} | {:.0} % |", store_write / raw_write * 100.0);
    println!("| read (page cache dropped) | {raw_read:.0} | {store_read:.0} | {:.0} % |", store_read / raw_read * 100.0);
    Ok(())
}

//! Peer pull throughput. A snapshot stored in a real sidecar's RocksDB store is pulled over its
//! authenticated peer API on loopback by the code a pulling sidecar runs (stream, decode, hash,
//! write, verify). The loopback TCP ceiling is measured in the same run.
//!
//! The snapshot is synthetic KV: f16 values drawn from a narrow bell curve, as attention keys
//! and values are, so zstd finds about as much to compress as in a real slot file.
//!
//! ```text
//! peer_transfer --megabytes 50 --runs 5
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use kvsidecar::config::{self, Overrides};
use kvsidecar::peer::index::FleetIndex;
use kvsidecar::peer::journal::Journal;
use kvsidecar::peer::{Fleet, Identity, PeerTable, Token};
use kvsidecar::prefix::Digest;
use kvsidecar::store::{NewSnapshot, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "Measure snapshot pulls between sidecars against the loopback TCP ceiling")]
struct Cli {
    /// Size of the snapshot in MB (10^6 bytes).
    #[arg(long, default_value_t = 50)]
    megabytes: u64,
    /// Pulls per setting; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

const TOKEN: &str = "benchmark-peer-token-0123456789";
const NAMESPACE: Digest = Digest([1; 32]);
const BLOCK: Digest = Digest([2; 32]);

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let bytes = cli.megabytes * 1_000_000;
    let work = tempfile::Builder::new().prefix("kvsidecar-peer-transfer-").tempdir()?;
    let data_dir = work.path().join("data");
    let file = work.path().join("snapshot.bin");
    std::fs::write(&file, synthetic_kv(bytes as usize))?;
    store_snapshot(&data_dir, &file, bytes)?;
    std::fs::remove_file(&file)?;

    let mb = |seconds: f64| bytes as f64 / 1e6 / seconds;
    let mut ceilings = Vec::new();
    for _ in 0..cli.runs {
        ceilings.push(loopback_seconds(bytes).await?);
    }
    let ceiling = middle(ceilings);
    println!("snapshot {} MB, {} runs each, median", cli.megabytes, cli.runs);
    println!("{:<28} {:>10} {:>10} {:>12}", "setting", "MB/s", "seconds", "of ceiling");
    println!("{:<28} {:>10.0} {:>10.3} {:>11.0} %", "loopback TCP ceiling", mb(ceiling), ceiling, 100.0);
    for (label, compression, level) in [("pull, uncompressed", "none", 3), ("pull, zstd level 1", "zstd", 1), ("pull, zstd level 3", "zstd", 3)] {
        let seconds = pull_median(work.path(), &data_dir, compression, level, cli.runs, bytes).await?;
        println!("{:<28} {:>10.0} {:>10.3} {:>11.0} %", label, mb(seconds), seconds, 100.0 * ceiling / seconds);
    }
    Ok(())
}

/// Returns `len` bytes of f16 values around zero with a spread like attention KV.
fn synthetic_kv(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // The sum of four uniform draws approximates a bell curve.
        let mut sum = 0.0f32;
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            sum += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        out.extend_from_slice(&f16_bits(sum * 0.8).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Converts a small f32 to IEEE half-precision bits (normal range, truncating).
fn f16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if exponent <= 0 {
        return sign;
    }
    sign | ((exponent.min(30) as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

fn settings(data_dir: &Path, compression: &str, level: u32, peer_port: u16) -> Result<config::Config> {
    let variables = [
        ("KVSIDECAR_STORE_DATA_DIR", data_dir.display().to_string()),
        ("KVSIDECAR_ENGINE_SLOT_DIR", data_dir.join("slots").display().to_string()),
        ("KVSIDECAR_SERVER_LISTEN", format!("127.0.0.1:{}", kvsidecar_tests::free_port())),
        ("KVSIDECAR_SERVER_ADMIN_LISTEN", format!("127.0.0.1:{}", kvsidecar_tests::free_port())),
        // No engine: the peer API serves the store whatever the engine's state.
        ("KVSIDECAR_ENGINE_URL", "http://127.0.0.1:9".to_string()),
        ("KVSIDECAR_STORE_CAPACITY", "1GiB".to_string()),
        ("KVSIDECAR_STORE_MAX_SNAPSHOT", "512MiB".to_string()),
        ("KVSIDECAR_PLUGINS_ROUTER_FILE", "builtin".to_string()),
        ("KVSIDECAR_PLUGINS_EVICTOR_FILE", "builtin".to_string()),
        ("KVSIDECAR_PLUGINS_ADMISSION_FILE", "builtin".to_string()),
        ("KVSIDECAR_PEERS_LISTEN", format!("127.0.0.1:{peer_port}")),
        ("KVSIDECAR_PEERS_COMPRESSION", compression.to_string()),
        ("KVSIDECAR_PEERS_ZSTD_LEVEL", level.to_string()),
        ("KVSIDECAR_PEERS_TOKEN_FILE", data_dir.with_extension("token").display().to_string()),
        ("KVSIDECAR_LOG_LEVEL", "error".to_string()),
    ];
    config::load(&Overrides::default(), variables.into_iter().map(|(key, value)| (key.to_string(), value))).map_err(|error| anyhow::anyhow!("{error}"))
}

fn store_snapshot(data_dir: &Path, file: &Path, bytes: u64) -> Result<()> {
    std::fs::write(data_dir.with_extension("token"), TOKEN)?;
    let settings = settings(data_dir, "none", 3, 0)?;
    let store = Store::open(&settings.store)?;
    let new = NewSnapshot {
        id: Digest([3; 32]),
        namespace: NAMESPACE,
        fingerprint: "benchmark".into(),
        tenant: "default".into(),
        tokens: vec![0; (bytes / 100_000) as usize],
        block_hashes: vec![BLOCK],
        block_tokens: 64,
    };
    store.insert(&new, file)?.context("the snapshot was already stored")?;
    Ok(())
}

/// Starts a sidecar on the store at `data_dir` sending with `compression`, pulls the snapshot
/// `runs` times, and returns the median seconds of a pull.
async fn pull_median(work: &Path, data_dir: &Path, compression: &str, level: u32, runs: usize, bytes: u64) -> Result<f64> {
    let port = kvsidecar_tests::free_port();
    let settings = settings(data_dir, compression, level, port)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kvsidecar::server::serve(settings.clone(), kvsidecar::telemetry::Telemetry::local(), async move {
        let _ = stopped.await;
    }));
    let client_dir = work.join("client");
    let identity = Identity::load(&client_dir).map_err(anyhow::Error::msg)?;
    let token = Token::load(&settings, Some(TOKEN.to_string())).map_err(anyhow::Error::msg)?.context("no token")?;
    let fleet = Fleet::new(identity, token, PeerTable::new(Duration::from_secs(2)), Arc::new(Journal::new(16)), FleetIndex::new(16), None);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.get(&url, "/peer/v1/info").await.is_err() {
        if server.is_finished() {
            let stopped = server.await?;
            anyhow::bail!("the sidecar stopped: {stopped:?}");
        }
        anyhow::ensure!(Instant::now() < deadline, "the sidecar's peer API did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let target = client_dir.join("pulled.bin");
    let mut seconds = Vec::new();
    for _ in 0..runs {
        let pulled = kvsidecar::peer::transfer::pull(&fleet, &url, &NAMESPACE, &BLOCK, &target, bytes * 2, Duration::from_secs(120)).await.map_err(|error| anyhow::anyhow!("pull failed: {error}"))?;
        anyhow::ensure!(pulled.bytes == bytes, "pulled {} bytes of {bytes}", pulled.bytes);
        seconds.push(pulled.elapsed.as_secs_f64());
        std::fs::remove_file(&target)?;
    }
    let _ = stop.send(());
    server.await?.map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok(middle(seconds))
}

/// Sends `bytes` from one loopback socket to another and returns the seconds it took.
async fn loopback_seconds(bytes: u64) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let sender = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let buffer = vec![7u8; 256 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buffer.len() as u64) as usize;
            stream.write_all(&buffer[..n]).await?;
            left -= n as u64;
        }
        stream.shutdown().await?;
        anyhow::Ok(())
    });
    let (mut stream, _) = listener.accept().await?;
    let started = Instant::now();
    let mut buffer = vec![0u8; 256 << 10];
    let mut received = 0u64;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    sender.await??;
    anyhow::ensure!(received == bytes, "received {received} of {bytes} bytes");
    Ok(elapsed)
}

fn middle(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

//! Snapshot transfer between sidecars. A peer requests the stored snapshot that contains a block
//! of its request's prefix. The response streams the snapshot's bytes, verified chunk by chunk as
//! they leave the store, and compressed with zstd unless `peers.compression = "none"`. The puller
//! writes the bytes to a file while hashing them, and uses the file only when its size and BLAKE3
//! digest equal what the sender announced.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;

use super::Fleet;
use crate::app::App;
use crate::config::Compression;
use crate::prefix::Digest;
use crate::engine::http_client::BoxError;
use crate::proxy::{ResponseBody, json_response};
use crate::store::StoreError;

/// Response header: the id of the snapshot sent.
pub const ID_HEADER: &str = "x-kvsidecar-snapshot-id";
/// Response header: the snapshot's size in bytes, before compression.
pub const BYTES_HEADER: &str = "x-kvsidecar-snapshot-bytes";
/// Response header: the BLAKE3 digest (hex) of the snapshot's bytes, before compression.
pub const DIGEST_HEADER: &str = "x-kvsidecar-snapshot-digest";

/// Frames buffered between the store reader and the connection.
const PIPE_FRAMES: usize = 8;

/// Serves `GET /peer/v1/snapshot?namespace=HEX&block=HEX`, which streams the stored snapshot of
/// `namespace` that contains `block`.
pub async fn serve(app: &Arc<App>, query: Option<&str>) -> Response<ResponseBody> {
    let mut namespace = None;
    let mut block = None;
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("namespace", value)) => namespace = Digest::from_hex(value),
            Some(("block", value)) => block = Digest::from_hex(value),
            _ => {}
        }
    }
    let (Some(namespace), Some(block)) = (namespace, block) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "send namespace=HEX&block=HEX, each a 64-digit hex digest".into());
    };
    let store = app.store.clone();
    let found = tokio::task::spawn_blocking(move || -> Result<Option<crate::store::SnapshotMeta>, StoreError> {
        let Some(id) = store.holding_block(&block)? else { return Ok(None) };
        Ok(store.meta(&id)?.filter(|meta| meta.namespace == namespace))
    })
    .await;
    let meta = match found {
        Ok(Ok(Some(meta))) => meta,
        Ok(Ok(None)) => return error(StatusCode::NOT_FOUND, "not_found", format!("no stored snapshot of namespace {namespace} holds block {block}")),
        Ok(Err(failure)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "store_error", failure.to_string()),
        Err(failure) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", failure.to_string()),
    };

    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(PIPE_FRAMES);
    let compression = app.config.peers.compression;
    let level = app.config.peers.zstd_level;
    let stall_limit = app.config.peers.transfer_timeout;
    let store = app.store.clone();
    let id = meta.id;
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let failed = sender.clone();
        let pipe = Pipe { sender, buffer: Vec::with_capacity(PIPE_CHUNK), runtime, stall_limit };
        let sent = match compression {
            Compression::None => send_plain(&store, &id, pipe),
            Compression::Zstd => send_zstd(&store, &id, pipe, level as i32),
        };
        if let Err(failure) = sent {
            // A store failure ends the body with an error, so the puller gets a broken transfer
            // rather than a short one that ends cleanly.
            tracing::warn!(snapshot.id = %id, error = %failure, "snapshot transfer to a peer failed");
            let _ = failed.blocking_send(Err(failure.to_string().into()));
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    let headers = response.headers_mut();
    headers.insert(ID_HEADER, header_value(&meta.id.to_hex()));
    headers.insert(BYTES_HEADER, HeaderValue::from(meta.bytes));
    headers.insert(DIGEST_HEADER, header_value(&meta.digest.to_hex()));
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static(compression.as_str()));
    response
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn error(status: StatusCode, code: &str, message: String) -> Response<ResponseBody> {
    json_response(status, &json!({"error": {"message": message, "code": code}}))
}

fn send_plain(store: &crate::store::Store, id: &Digest, mut pipe: Pipe) -> Result<(), StoreError> {
    // Each chunk goes out as its own frame, without a copy.
    store.read_owned_chunks(id, |chunk| pipe.send(Bytes::from(chunk.into_vec())))?;
    Ok(())
}

fn send_zstd(store: &crate::store::Store, id: &Digest, pipe: Pipe, level: i32) -> Result<(), StoreError> {
    let io = |source| StoreError::File { path: "zstd encoder".into(), source };
    let mut encoder = zstd::stream::write::Encoder::new(pipe, level).map_err(io)?;
    store.read_chunks(id, |chunk| encoder.write_all(chunk))?;
    let mut pipe = encoder.finish().map_err(io)?;
    pipe.flush().map_err(io)
}

/// Bytes per frame sent to the connection.
const PIPE_CHUNK: usize = 256 << 10;

/// A blocking writer that hands full buffers to the response body. A puller that takes no frame
/// for `stall_limit` ends the transfer, so a hung connection does not pin a blocking thread and
/// a store iterator.
struct Pipe {
    sender: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    buffer: Vec<u8>,
    runtime: tokio::runtime::Handle,
    stall_limit: Duration,
}

impl Write for Pipe {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= PIPE_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let bytes = Bytes::from(std::mem::replace(&mut self.buffer, Vec::with_capacity(PIPE_CHUNK)));
        self.send(bytes)
    }
}

impl Pipe {
    /// Hands `bytes` to the response body as one frame.
    fn send(&mut self, bytes: Bytes) -> std::io::Result<()> {
        let frame = Frame::data(bytes);
        let sent = self.runtime.block_on(tokio::time::timeout(self.stall_limit, self.sender.send(Ok(frame))));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the peer closed the connection")),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer took no data for peers.transfer_timeout")),
        }
    }
}

/// Failure of a pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The peer no longer stores a matching snapshot.
    #[error("the peer stores no matching snapshot any more")]
    Gone,
    /// The bytes arrived but are not what the peer announced.
    #[error("transfer corrupted: {0}")]
    Corrupt(String),
    /// The peer or the connection failed.
    #[error("{0}")]
    Failed(String),
}

/// A snapshot pulled from a peer into a local file, verified against the peer's announcement.
#[derive(Debug)]
pub struct Pulled {
    pub id: Digest,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Pulls the snapshot of `namespace` that contains `block` from the peer at `url` into `path`,
/// within `within`. The file is removed again unless the pull verified.
pub async fn pull(fleet: &Fleet, url: &str, namespace: &Digest, block: &Digest, path: &Path, max_bytes: u64, within: Duration) -> Result<Pulled, PullError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    // The deadline applies inside, so the file writer has always finished when this returns and
    // a failed pull's file is removed after its last write.
    match pull_into(fleet, url, namespace, block, path.to_path_buf(), max_bytes, deadline, within).await {
        Ok((id, bytes)) => Ok(Pulled { id, bytes, elapsed: started.elapsed() }),
        Err(failure) => {
            let _ = tokio::fs::remove_file(path).await;
            Err(failure)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn pull_into(fleet: &Fleet, url: &str, namespace: &Digest, block: &Digest, path: PathBuf, max_bytes: u64, deadline: tokio::time::Instant, within: Duration) -> Result<(Digest, u64), PullError> {
    let timed_out = || format!("no complete transfer within {}", humantime::format_duration(within));
    let path_and_query = format!("/peer/v1/snapshot?namespace={namespace}&block={block}");
    let response = tokio::time::timeout_at(deadline, fleet.get(url, &path_and_query)).await.map_err(|_| PullError::Failed(timed_out()))?.map_err(PullError::Failed)?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Err(PullError::Gone);
    }
    if !status.is_success() {
        return Err(PullError::Failed(format!("the peer responded {status} to a snapshot request")));
    }
    let announced = Announced::from_headers(response.headers(), max_bytes)?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(PIPE_FRAMES);
    let expected = announced.bytes;
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, Digest), PullError> {
        let file = std::fs::File::create(&path).map_err(|error| PullError::Failed(format!("cannot create {}: {error}", path.display())))?;
        // Frames of 64 KiB and more bypass the buffer and go to the file without a copy.
        let sink = HashingFile { file: std::io::BufWriter::with_capacity(64 << 10, file), hasher: blake3::Hasher::new(), written: 0, limit: expected };
        let corrupt = |error: std::io::Error| PullError::Corrupt(error.to_string());
        let sink = match announced.compression {
            Compression::None => {
                let mut sink = sink;
                while let Some(bytes) = receiver.blocking_recv() {
                    sink.write_all(&bytes).map_err(corrupt)?;
                }
                sink
            }
            Compression::Zstd => {
                let mut decoder = zstd::stream::write::Decoder::new(sink).map_err(|error| PullError::Failed(error.to_string()))?;
                // Levels 1 to 19 use windows of at most 8 MiB (2^23), so a frame asking for more
                // comes from no sidecar and is refused before its window is allocated.
                decoder.window_log_max(23).map_err(|error| PullError::Failed(error.to_string()))?;
                while let Some(bytes) = receiver.blocking_recv() {
                    decoder.write_all(&bytes).map_err(corrupt)?;
                }
                decoder.flush().map_err(corrupt)?;
                decoder.into_inner()
            }
        };
        sink.finish().map_err(|error| PullError::Failed(error.to_string()))
    });

    let mut body = response.into_body();
    let receive = async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data()
                        && sender.send(data).await.is_err()
                    {
                        // The writer stopped, and its own error gives the reason.
                        return None;
                    }
                }
                Err(error) => return Some(format!("the transfer broke off: {error}")),
            }
        }
        None
    };
    let broken = tokio::time::timeout_at(deadline, receive).await.unwrap_or_else(|_| Some(timed_out()));
    drop(sender);
    let written = writer.await.map_err(|error| PullError::Failed(error.to_string()))?;
    if let Some(reason) = broken {
        return Err(PullError::Failed(reason));
    }
    let (bytes, digest) = written?;
    if bytes != announced.bytes {
        return Err(PullError::Corrupt(format!("received {bytes} bytes, the peer announced {}", announced.bytes)));
    }
    if digest != announced.digest {
        return Err(PullError::Corrupt(format!("BLAKE3 digest {digest} of the received bytes differs from the announced {}", announced.digest)));
    }
    Ok((announced.id, bytes))
}

/// Snapshot id, size, digest and encoding from the sender's response headers.
struct Announced {
    id: Digest,
    bytes: u64,
    digest: Digest,
    compression: Compression,
}

impl Announced {
    fn from_headers(headers: &HeaderMap, max_bytes: u64) -> Result<Announced, PullError> {
        let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_string();
        let invalid = |name: &str| PullError::Failed(format!("the peer sent an invalid {name} header: {:?}", text(name)));
        let id = Digest::from_hex(&text(ID_HEADER)).ok_or_else(|| invalid(ID_HEADER))?;
        let digest = Digest::from_hex(&text(DIGEST_HEADER)).ok_or_else(|| invalid(DIGEST_HEADER))?;
        let bytes: u64 = text(BYTES_HEADER).parse().map_err(|_| invalid(BYTES_HEADER))?;
        if bytes > max_bytes {
            return Err(PullError::Failed(format!("the peer's snapshot of {bytes} bytes exceeds store.max_snapshot ({max_bytes} bytes)")));
        }
        let compression = match text(http::header::CONTENT_ENCODING.as_str()).as_str() {
            "zstd" => Compression::Zstd,
            "" | "identity" => Compression::None,
            _ => return Err(invalid(http::header::CONTENT_ENCODING.as_str())),
        };
        Ok(Announced { id, bytes, digest, compression })
    }
}

/// A file writer that hashes what it writes and refuses to grow past `limit` bytes.
struct HashingFile {
    file: std::io::BufWriter<std::fs::File>,
    hasher: blake3::Hasher,
    written: u64,
    limit: u64,
}

impl HashingFile {
    fn finish(mut self) -> std::io::Result<(u64, Digest)> {
        self.file.flush()?;
        Ok((self.written, Digest(*self.hasher.finalize().as_bytes())))
    }
}

impl Write for HashingFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written + data.len() as u64 > self.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("more bytes than the {} announced", self.limit)));
        }
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

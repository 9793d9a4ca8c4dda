//! Listeners, background tasks and graceful shutdown of `kvsidecar serve`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::engine::llamacpp::LlamaCpp;
use crate::config::Config;
use crate::proxy::ResponseBody;
use crate::costs::Costs;
use crate::peer::index::FleetIndex;
use crate::peer::journal::Journal;
use crate::peer::{self, Fleet, Identity, PeerTable, Token};
use crate::plugin::{self, Plugins};
use crate::ledger::Ledger;
use crate::store::Store;
use crate::telemetry::Telemetry;
use crate::{admin, monitor, proxy};

/// Failure to start `serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to listen on {addr} ({what}): {source}\nhint: choose a free address with {flag}")]
    Bind { addr: SocketAddr, what: &'static str, flag: &'static str, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}\nhint: fix or move the folder, or set ledger.enabled = false to serve without the cost ledger")]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("failed to create the slot folder {path}: {source}")]
    SlotDir { path: String, source: std::io::Error },
    #[error("{0}\nhint: build or fix the component, point plugins.{kind}.file at another one (an absolute path, or one in plugins.dir), or set it to \"builtin\"", kind = .0.kind)]
    Plugin(#[from] crate::plugin::StartError),
    #[error("fleet: {0}")]
    Fleet(String),
}

/// Runs the sidecar until `shutdown` resolves, then drains connections for the grace period.
pub async fn serve(config: Config, telemetry: Arc<Telemetry>, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.engine.slot_dir)
        .map_err(|source| ServeError::SlotDir { path: config.engine.slot_dir.display().to_string(), source })?;
    remove_stale_slot_files(&config.engine.slot_dir);
    let store = Arc::new(Store::open(&config.store)?);
    let plugin_config = config.clone();
    let plugins = tokio::task::spawn_blocking(move || Plugins::load(&plugin_config))
        .await
        .map_err(|error| crate::plugin::StartError { kind: crate::plugin::Kind::Router, error: error.to_string() })??;
    let plugins = Arc::new(plugins);
    let costs = Arc::new(Costs::default());
    plugins.evictor.attach(&store, costs.clone());
    let ledger = if config.ledger.enabled { Some(Arc::new(Ledger::open(&config.ledger, &config.store.data_dir, costs.clone())?)) } else { None };
    let client_listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: config.server.listen, what: "client API", flag: "--listen", source })?;
    let admin_listener = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|source| ServeError::Bind { addr: config.server.admin_listen, what: "admin API", flag: "--admin-listen", source })?;
    let peer_tls = peer::tls::Tls::load(&config.peers).map_err(ServeError::Fleet)?;
    let fleet = match Token::load(&config, std::env::var(peer::TOKEN_VARIABLE).ok()).map_err(ServeError::Fleet)? {
        Some(token) => {
            let identity = Identity::load(&config.store.data_dir).map_err(ServeError::Fleet)?;
            let journal = Arc::new(Journal::new(config.peers.journal_entries as usize));
            store.set_observer(journal.clone());
            let index = FleetIndex::new(config.peers.index_blocks as usize);
            Some(Arc::new(Fleet::new(identity, token, PeerTable::new(config.peers.dead_after), journal, index, peer_tls.as_ref())))
        }
        None => None,
    };
    let peer_listener = match config.peers.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, what: "peer API", flag: "--peer-listen", source })?,
        ),
        None => None,
    };

    let engine = Arc::new(LlamaCpp::new(&config.engine));
    let grace = config.server.shutdown_grace;
    let watch_plugins = config.plugins.watch;
    let mut app = App::new(config, engine, store.clone(), plugins.clone(), costs, fleet.clone(), telemetry.clone());
    app.ledger = ledger.clone();
    let app = Arc::new(app);
    crate::telemetry::metrics::observe(telemetry.meter_provider(), &app, &telemetry.counters);
    let watcher = if watch_plugins { plugin::watch(plugins) } else { None };
    let (stop_sender, stop) = watch::channel(false);

    tracing::info!(
        listen = %local_addr(&client_listener),
        admin_listen = %local_addr(&admin_listener),
        peer_listen = ?peer_listener.as_ref().map(local_addr),
        node_id = ?fleet.as_ref().map(|fleet| fleet.identity.node_id.clone()),
        engine.url = %app.config.engine.url,
        data_dir = %app.config.store.data_dir.display(),
        "kvsidecar serving"
    );

    let monitor = tokio::spawn(monitor::run(app.clone(), stop.clone()));
    let access = tokio::spawn(flush_access(store.clone(), stop.clone()));
    let client_app = app.clone();
    let header_timeout = app.config.server.header_timeout;
    let client = tokio::spawn(accept(client_listener, None, stop.clone(), header_timeout, move |request| proxy::handle(client_app.clone(), request)));
    let admin_app = app.clone();
    let admin = tokio::spawn(accept(admin_listener, None, stop.clone(), header_timeout, move |request| admin::handle(admin_app.clone(), request)));
    let peer_api = peer_listener.map(|listener| {
        let peer_app = app.clone();
        let acceptor = peer_tls.as_ref().map(|tls| tls.acceptor.clone());
        tokio::spawn(accept(listener, acceptor, stop.clone(), header_timeout, move |request| peer::handle(peer_app.clone(), request)))
    });
    let health = tokio::spawn(peer::run_health(app.clone(), stop.clone()));

    shutdown.await;
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: no new connections, draining requests");
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(grace, async {
        let _ = client.await;
        let _ = admin.await;
        if let Some(peer_api) = peer_api {
            let _ = peer_api.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still running after the shutdown grace period were cut");
    }
    let _ = monitor.await;
    let _ = access.await;
    let _ = health.await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Err(error) = tokio::task::spawn_blocking(move || store.flush_access()).await {
        tracing::warn!(error = %error, "failed to write the last access records");
    }
    if let Some(ledger) = ledger {
        match tokio::task::spawn_blocking(move || ledger.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(error = %error, "failed to write the last ledger records"),
            Err(error) => tracing::error!(error = %error, "ledger flush task failed"),
        }
    }
    tracing::info!("kvsidecar stopped");
    Ok(())
}

/// Deletes slot files an earlier sidecar process left behind when it stopped between writing a
/// file and removing it. Only names that kvsidecar itself writes (`kvsidecar-*.bin`) are touched.
fn remove_stale_slot_files(slot_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(slot_dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("kvsidecar-") && name.ends_with(".bin") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = %name, "removed a slot file left by an earlier run"),
                Err(error) => tracing::warn!(file = %name, error = %error, "failed to remove a stale slot file"),
            }
        }
    }
}

fn local_addr(listener: &TcpListener) -> String {
    listener.local_addr().map(|addr| addr.to_string()).unwrap_or_default()
}

/// Accepts connections until `stop` changes, then waits for open connections to finish. With
/// `tls`, each connection completes a TLS handshake (within the header timeout) first.
async fn accept<F, Fut>(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, mut stop: watch::Receiver<bool>, header_timeout: std::time::Duration, handler: F)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<ResponseBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper applies no timeouts, and a client that sends half a request or
    // nothing at all keeps its connection open forever.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(header_timeout).keep_alive_timeout(header_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(error = %error, "failed to accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(handler(request).await) }
        });
        // hyper's header timeout starts once it has read the first bytes (the HTTP/1 or HTTP/2
        // preface), so a connection that sends nothing is closed here.
        let builder = builder.clone();
        let graceful_watch = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    tracing::debug!(client.addr = %peer, "connection sent no request within the header timeout; closing it");
                    return;
                }
            }
            let served = match tls {
                None => graceful_watch.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service)).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(secured)) => graceful_watch.watch(builder.serve_connection_with_upgrades(TokioIo::new(secured), service)).await,
                    Ok(Err(error)) => {
                        tracing::info!(client.addr = %peer, error = %error, "TLS handshake with a peer failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(client.addr = %peer, "TLS handshake not finished within the header timeout; closing the connection");
                        return;
                    }
                },
            };
            if let Err(error) = served {
                tracing::debug!(client.addr = %peer, error = %error, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// Writes snapshot access records to the store whenever some are queued.
async fn flush_access(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = store.access_recorded() => {}
            _ = stop.changed() => return,
        }
        // Batch the records of a burst of hits into one write.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let flushing = store.clone();
        match tokio::task::spawn_blocking(move || flushing.flush_access()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "failed to write access records"),
            Err(error) => tracing::warn!(error = %error, "access record task failed"),
        }
    }
}

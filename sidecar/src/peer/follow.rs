//! Following one peer's index: long-polls of its `/peer/v1/index` from the position this sidecar
//! has reached, applied to the fleet index. A new generation of the peer, or a position that
//! left its journal, brings a full listing instead.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::journal::IndexEvent;
use crate::app::App;

/// How long a peer may hold a long-poll open.
const WAIT: Duration = Duration::from_secs(5);

/// Largest index response read. A full listing of a large store is the big case.
// NOTE: a store of tens of thousands of long snapshots could exceed this; the listing would then
// fail and be retried. Paging the listing would remove the limit.
const MAX_INDEX_BYTES: usize = 256 << 20;

#[derive(Deserialize)]
struct IndexResponse {
    generation: String,
    last: u64,
    #[serde(default)]
    resync: bool,
    #[serde(default)]
    events: Vec<IndexEvent>,
    #[serde(default)]
    snapshots: Vec<IndexEvent>,
}

/// Follows the index of the peer at `url` until the task is aborted.
pub async fn follow(app: Arc<App>, url: String) {
    let Some(fleet) = app.fleet.clone() else { return };
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let pause = app.config.peers.health_interval;
    loop {
        let (generation, since) = fleet.index.position(&url).unwrap_or_default();
        let uri = format!("{url}/peer/v1/index?since={since}&generation={generation}&wait_ms={}", WAIT.as_millis());
        match fetch(&client, &fleet.token.header(), &uri).await {
            Ok(response) if response.resync => {
                tracing::debug!(peer.url = %url, peer.generation = %response.generation, snapshots = response.snapshots.len(), "peer index read in full");
                fleet.index.replace(&url, response.generation, response.last, response.snapshots);
            }
            Ok(response) if response.generation == generation => fleet.index.apply(&url, response.last, response.events),
            Ok(_) => {
                // Events of another generation than ours: read the whole index next.
                fleet.index.forget(&url);
            }
            Err(error) => {
                tracing::debug!(peer.url = %url, error = %error, "peer index read failed; retrying");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn fetch(client: &Client<HttpConnector, Empty<Bytes>>, authorization: &str, uri: &str) -> Result<IndexResponse, String> {
    let request = http::Request::get(uri).header(http::header::AUTHORIZATION, authorization).body(Empty::new()).map_err(|error| error.to_string())?;
    let exchange = async {
        let response = client.request(request).await.map_err(|error| format!("unreachable: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_INDEX_BYTES).collect().await.map_err(|error| format!("body failed: {error}"))?.to_bytes();
        serde_json::from_slice::<IndexResponse>(&body).map_err(|error| format!("invalid index response: {error}"))
    };
    tokio::time::timeout(WAIT * 2, exchange).await.map_err(|_| "no answer within the long-poll time".to_string())?
}

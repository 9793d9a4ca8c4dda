//! Following one peer's index: long-polls of its `/peer/v1/index` from the position this sidecar
//! has reached, applied to the fleet index. A new generation of the peer, or a position that
//! left its journal, brings a full listing instead.

use std::sync::Arc;
use std::time::Duration;

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
    /// The peer's load and engine state, as `/peer/v1/info` gives them.
    #[serde(default)]
    info: Option<serde_json::Value>,
}

/// Follows the index of the peer at `url` until the task is aborted.
pub async fn follow(app: Arc<App>, url: String) {
    let Some(fleet) = app.fleet.clone() else { return };
    let pause = app.config.peers.health_interval;
    loop {
        let (generation, since) = fleet.index.position(&url).unwrap_or_default();
        let path = format!("/peer/v1/index?since={since}&generation={generation}&wait_ms={}", WAIT.as_millis());
        let answer = fleet.get_json::<IndexResponse>(&url, &path, MAX_INDEX_BYTES, WAIT * 2).await;
        if let Ok(IndexResponse { info: Some(info), .. }) = &answer
            && info["node_id"].as_str() != Some(fleet.identity.node_id.as_str())
        {
            fleet.peers.record_ok(&url, info);
        }
        match answer {
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

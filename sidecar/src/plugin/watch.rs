//! Reloads a plugin when its component file changes. The folders of the plugin files are
//! watched, not the files, so a file replaced by rename (as `kvsidecar plugin build` and most
//! deploy tools do) is seen too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};

use super::{Kind, Plugins, Reloaded};

/// Time to wait after a change for more changes, so a file written in several steps loads once.
const SETTLE: Duration = Duration::from_millis(15);

/// Starts watching the plugin files and returns the task that reloads them. The task runs until
/// the runtime stops.
pub fn watch(plugins: Arc<Plugins>) -> Option<tokio::task::JoinHandle<()>> {
    // Events name absolute paths, so relative settings are made absolute first.
    let files: Vec<(Kind, PathBuf)> = plugins.files().into_iter().map(|(kind, file)| (kind, std::path::absolute(&file).unwrap_or(file))).collect();
    if files.is_empty() {
        return None;
    }
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Kind>();
    let watched = files.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        for (kind, file) in &watched {
            if event.paths.iter().any(|path| path == file) {
                let _ = sender.send(*kind);
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::error!(error = %error, "cannot watch plugin files; reload them with POST /admin/plugins/reload");
            return None;
        }
    };
    let folders: BTreeSet<PathBuf> = files.iter().filter_map(|(_, file)| file.parent().map(PathBuf::from)).collect();
    for folder in &folders {
        if let Err(error) = watcher.watch(folder, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), error = %error, "cannot watch plugin folder; reload its plugins with POST /admin/plugins/reload");
        }
    }
    Some(tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        while let Some(first) = receiver.recv().await {
            tokio::time::sleep(SETTLE).await;
            let mut kinds = vec![first];
            while let Ok(more) = receiver.try_recv() {
                kinds.push(more);
            }
            for kind in Kind::ALL.into_iter().filter(|kind| kinds.contains(kind)) {
                let plugins = plugins.clone();
                match tokio::task::spawn_blocking(move || plugins.reload(kind)).await {
                    Ok(Reloaded::Loaded { version, sha256, .. }) => tracing::info!(plugin.kind = %kind, plugin.version = %version, plugin.sha256 = %sha256, "plugin file changed; new version serving"),
                    Ok(_) => {}
                    Err(error) => tracing::error!(plugin.kind = %kind, error = %error, "plugin reload task failed"),
                }
            }
        }
    }))
}

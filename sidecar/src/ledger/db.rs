//! Opening the ledger's RocksDB database, and moving a damaged one aside.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, Options};

use super::LedgerError;
use super::encoding::{MERGE_OPERATOR, merge_totals};

/// Column family of task totals, keyed by task key.
pub(super) const TASKS: &str = "tasks";
/// Column family of request records, keyed by task key and sequence number.
pub(super) const REQUESTS: &str = "requests";
/// Column family of the ledger's own state.
pub(super) const META: &str = "meta";
/// Key in `meta`: the next request record's sequence number, 8 bytes big-endian.
pub(super) const NEXT_SEQUENCE: &[u8] = b"next_sequence";

/// Returns whether an error is RocksDB's report of damaged data.
pub(super) fn is_corruption(error: &LedgerError) -> bool {
    matches!(error, LedgerError::Db(error) if error.kind() == rocksdb::ErrorKind::Corruption)
}

/// Moves a damaged database aside to `ledger.damaged-<unix ms>` beside it, for inspection, so
/// that an empty one can take its place.
pub(super) fn move_aside(path: &Path, error: &LedgerError) -> Result<(), LedgerError> {
    let aside = path.with_file_name(format!("ledger.damaged-{}", super::now_ms()));
    tracing::error!(ledger.path = %path.display(), moved_to = %aside.display(), error = %error, "ledger database is damaged; starting an empty ledger");
    std::fs::rename(path, &aside)
        .map_err(|rename| LedgerError::Open { path: path.display().to_string(), reason: format!("{error}; moving it aside failed: {rename}") })
}

/// Opens or creates the database at `path`. Damaged data is an `LedgerError::Db` error for
/// which `is_corruption` holds.
pub(super) fn open(path: &Path) -> Result<DB, LedgerError> {
    std::fs::create_dir_all(path).map_err(|error| LedgerError::Open { path: path.display().to_string(), reason: error.to_string() })?;

    let options = crate::store::bounded_options();

    let mut tasks = Options::default();
    tasks.set_merge_operator_associative(MERGE_OPERATOR, merge_totals);
    let families = vec![
        ColumnFamilyDescriptor::new(TASKS, tasks),
        ColumnFamilyDescriptor::new(REQUESTS, Options::default()),
        ColumnFamilyDescriptor::new(META, Options::default()),
    ];
    match DB::open_cf_descriptors(&options, path, families) {
        Ok(db) => Ok(db),
        Err(error) if error.kind() == rocksdb::ErrorKind::Corruption => Err(LedgerError::Db(error)),
        Err(error) => {
            let mut reason = error.to_string();
            if reason.contains("lock") {
                reason.push_str("\nhint: another kvsidecar process is probably using this data dir; stop it or choose another --data-dir");
            }
            Err(LedgerError::Open { path: path.display().to_string(), reason })
        }
    }
}

/// Returns a column family of a database opened by `open`.
pub(super) fn family<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // `open` creates every family, so the handle always exists.
    db.cf_handle(name).expect("column family created at open")
}

/// Reads the next sequence number. A missing value starts at 0. An unreadable one starts at the
/// current time in microseconds, which is above every sequence number a ledger hands out by
/// counting.
pub(super) fn next_sequence(db: &DB) -> Result<u64, LedgerError> {
    let Some(value) = db.get_cf(family(db, META), NEXT_SEQUENCE)? else { return Ok(0) };
    match <[u8; 8]>::try_from(value.as_slice()) {
        Ok(bytes) => Ok(u64::from_be_bytes(bytes)),
        Err(_) => {
            let restart = super::now_ms().saturating_mul(1000);
            tracing::warn!(bytes = value.len(), restart, "ledger sequence number is damaged; numbering request records from the current time");
            Ok(restart)
        }
    }
}

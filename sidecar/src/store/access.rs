//! Access records (hits) carried off the request path through a bounded ring buffer and written
//! to the snapshot metadata in batches by a background task.

use std::sync::Mutex;

use ringbuf::HeapRb;
use ringbuf::traits::{Consumer, Producer, Split};

use crate::prefix::Digest;

/// Capacity of the ring in access records; records pushed while it is full are dropped.
const CAPACITY: usize = 4096;

/// One snapshot access: a restore that used it.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub id: Digest,
    pub at_ms: u64,
}

type Producer_ = ringbuf::HeapProd<Access>;
type Consumer_ = ringbuf::HeapCons<Access>;

/// The access ring. `push` takes a short in-memory lock and does no I/O.
pub struct AccessLog {
    producer: Mutex<Producer_>,
    consumer: Mutex<Consumer_>,
    notify: tokio::sync::Notify,
}

impl AccessLog {
    pub fn new() -> AccessLog {
        let (producer, consumer) = HeapRb::<Access>::new(CAPACITY).split();
        AccessLog { producer: Mutex::new(producer), consumer: Mutex::new(consumer), notify: tokio::sync::Notify::new() }
    }

    /// Records an access; returns false when the ring is full and the record was dropped.
    pub fn push(&self, access: Access) -> bool {
        let pushed = match self.producer.lock() {
            Ok(mut producer) => producer.try_push(access).is_ok(),
            Err(_) => false,
        };
        self.notify.notify_one();
        pushed
    }

    /// Takes every queued record.
    pub fn drain(&self) -> Vec<Access> {
        match self.consumer.lock() {
            Ok(mut consumer) => consumer.pop_iter().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until a record is pushed.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

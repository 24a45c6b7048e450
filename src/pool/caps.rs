//! Server-side caps shared by several pools: `max_db_connections` (all users of one database)
//! and `max_user_connections` (all databases of one upstream user). A pool that needs a new
//! server while its cap is reached first closes an idle server of a sibling pool.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ServerPool;
use crate::error::UpstreamError;

/// How often a pool waiting under a full cap looks for an idle server to close.
const RECHECK: Duration = Duration::from_millis(100);

/// One shared cap.
pub struct Cap {
    /// The setting, for messages (`max_db_connections`, `max_user_connections`).
    pub setting: &'static str,
    /// The database or user it applies to.
    pub name: String,
    pub max: usize,
    permits: Arc<Semaphore>,
    /// The pools that count against it.
    pools: Mutex<Vec<Weak<ServerPool>>>,
}

impl Cap {
    pub fn new(setting: &'static str, name: &str, max: usize) -> Cap {
        Cap {
            setting,
            name: name.to_owned(),
            max,
            permits: Arc::new(Semaphore::new(max)),
            pools: Mutex::new(Vec::new()),
        }
    }

    pub fn add_pool(&self, pool: Weak<ServerPool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(pool);
    }

    /// A place for one more server connection, held as long as that connection lives. When the
    /// cap is reached, an idle server of another pool is closed to make room; otherwise this
    /// waits (at most `wait`) for one to close.
    pub async fn acquire(&self, wait: Duration) -> Result<OwnedSemaphorePermit, UpstreamError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return Ok(permit);
            }
            self.make_room();
            // Servers of other pools become idle without telling us: look again shortly.
            let next = (tokio::time::Instant::now() + RECHECK).min(deadline);
            if let Ok(Ok(permit)) =
                tokio::time::timeout_at(next, self.permits.clone().acquire_owned()).await
            {
                return Ok(permit);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(UpstreamError::CapReached {
                    setting: self.setting,
                    name: self.name.clone(),
                    max: self.max,
                });
            }
        }
    }

    fn make_room(&self) {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for pool in pools.iter().filter_map(Weak::upgrade) {
            if pool.close_one_idle() {
                return;
            }
        }
    }
}

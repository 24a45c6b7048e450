//! Server-side caps shared by several pools: `max_db_connections` (all users of one database),
//! `max_user_connections` (all databases of one upstream user) and the connection budget of an
//! upstream host (`instances = "auto"`, whose maximum moves). A pool that needs a new server
//! while its cap is reached first closes an idle server of a sibling pool.

use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The limit now ([`Cap::resize`] moves it).
    max: AtomicUsize,
    permits: Arc<Semaphore>,
    /// Permits still to take out of circulation after the limit was lowered: they are held by
    /// servers, and are forgotten as those close (never by cutting a transaction).
    debt: Mutex<usize>,
    /// The pools that count against it.
    pools: Mutex<Vec<Weak<ServerPool>>>,
}

impl Cap {
    pub fn new(setting: &'static str, name: &str, max: usize) -> Cap {
        Cap {
            setting,
            name: name.to_owned(),
            max: AtomicUsize::new(max),
            permits: Arc::new(Semaphore::new(max)),
            debt: Mutex::new(0),
            pools: Mutex::new(Vec::new()),
        }
    }

    /// The limit now.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Places held now (servers open or logging in), which may exceed [`Cap::max`] for a while
    /// after it was lowered.
    pub fn in_use(&self) -> usize {
        let debt = *self.debt.lock().unwrap_or_else(|e| e.into_inner());
        (self.max() + debt).saturating_sub(self.permits.available_permits())
    }

    /// Moves the limit to `max`. Raising it frees places at once (first paying back any debt);
    /// lowering it takes free places out now and the rest as servers close: idle ones are
    /// closed for it, busy ones when their transaction is over.
    pub fn resize(self: &Arc<Self>, max: usize) {
        let mut debt = self.debt.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.max.swap(max, Ordering::AcqRel);
        if max >= old {
            let grow = max - old;
            let repaid = grow.min(*debt);
            *debt -= repaid;
            self.permits.add_permits(grow - repaid);
            return;
        }
        let shrink = old - max;
        let now = self.permits.forget_permits(shrink);
        let start_collector = *debt == 0 && now < shrink;
        *debt += shrink - now;
        if start_collector {
            tokio::spawn(collect_debt(Arc::downgrade(self)));
        }
    }

    /// Takes one permit back for the debt (`false` when there is none left to pay).
    fn repay(&self, permit: OwnedSemaphorePermit) -> bool {
        let mut debt = self.debt.lock().unwrap_or_else(|e| e.into_inner());
        if *debt > 0 {
            permit.forget();
            *debt -= 1;
        }
        *debt > 0
    }

    fn debt(&self) -> usize {
        *self.debt.lock().unwrap_or_else(|e| e.into_inner())
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
                    max: self.max(),
                });
            }
        }
    }

    /// Closes one idle server of the pools under this cap; `true` if it did.
    fn make_room(&self) -> bool {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner()).clone();
        pools
            .iter()
            .filter_map(Weak::upgrade)
            .any(|pool| pool.close_one_idle())
    }
}

/// After a cap was lowered below what is in use: closes idle servers and forgets the permits
/// they give back until the debt is paid (or the cap is raised again, or gone). Waiting for a
/// permit queues behind earlier waiters (the semaphore is FIFO), so new servers of this cap
/// wait for the debt first.
async fn collect_debt(cap: Weak<Cap>) {
    loop {
        let Some(strong) = cap.upgrade() else { return };
        let debt = strong.debt();
        if debt == 0 {
            return;
        }
        for _ in 0..debt {
            if !strong.make_room() {
                break;
            }
        }
        let permits = strong.permits.clone();
        drop(strong);
        // Busy servers come back without telling us: look again shortly.
        let Ok(Ok(permit)) = tokio::time::timeout(RECHECK, permits.acquire_owned()).await else {
            continue;
        };
        match cap.upgrade() {
            Some(strong) if strong.repay(permit) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 5 s) for `cond`: the debt collector runs on its own task.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn a_lowered_cap_takes_places_back_as_servers_close_and_a_raise_repays_first() {
        let cap = Arc::new(Cap::new("connection_budget", "h:1", 3));
        let take = || cap.permits.clone().try_acquire_owned();
        let mut held: Vec<_> = (0..3).map(|_| take().expect("a place")).collect();
        cap.resize(1);
        assert_eq!((cap.max(), cap.in_use()), (1, 3), "nothing is cut");
        held.pop();
        eventually("a closed server's place is forgotten", || {
            cap.permits.available_permits() == 0
        })
        .await;
        assert_eq!(cap.in_use(), 2);
        assert!(take().is_err(), "still over the new cap: no new place");
        cap.resize(2);
        assert!(take().is_err(), "the raise first repays the debt");
        held.pop();
        eventually("under the cap, places come back", || {
            cap.permits.available_permits() == 1
        })
        .await;
        assert_eq!((cap.max(), cap.in_use()), (2, 1));
        cap.resize(4);
        assert_eq!(cap.permits.available_permits(), 3);
    }
}

//! A connection budget that holds across Floodgate instances (`instances = "auto"`), with
//! PostgreSQL's own view of who is connected as the only shared state: no consensus protocol,
//! no table, no messages between instances.
//!
//! Per upstream host, each instance keeps one *coordination connection* open (never handed to a
//! client) whose `application_name` is `floodgate/budget=<claim>/<instance id>`, and polls
//! through it every `budget_period` ([`poll`]). One such backend in `pg_stat_activity` is one
//! live instance; `<claim>` is the most server connections that instance may hold until it
//! polls again. The budget is `floor(connection_budget x (max_connections -
//! superuser_reserved_connections))` server connections (coordination connections, one per
//! instance, are outside it), and each instance's fair share is `budget / live instances`.
//!
//! Why the sum holds: an instance at or above its fair share drops to it at once (its claim
//! stays at what it still holds until idle servers close); an instance below it grows only into
//! room no one else claims, counting every other instance at no less than its own fair share
//! (so two instances growing at the same moment cannot take the same room) and every backend
//! of our users that no live instance accounts for (a dead instance's last servers, direct
//! connections). A newcomer takes nothing until it has been visible for one period, so every
//! other instance has seen it before it grows. Pool servers are otherwise ordinary: their
//! `application_name` at login is `floodgate/<instance id>` (the default a RESET returns to),
//! and while a client is attached they show the client's.

pub mod poll;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::pool::caps::Cap;

/// Prefix of every `application_name` Floodgate gives its connections.
pub const MARK: &str = "floodgate/";

/// Prefix of the coordination connections' `application_name`.
pub const COORDINATOR: &str = "floodgate/budget=";

/// The `application_name` of pool servers: `floodgate/<id>`.
pub fn server_mark(id: &str) -> String {
    format!("{MARK}{id}")
}

/// The `application_name` of a coordination connection claiming `claim` servers.
pub fn coordinator_name(claim: usize, id: &str) -> String {
    format!("{COORDINATOR}{claim}/{id}")
}

/// The claim of a coordination connection's `application_name` (`None`: not one).
pub fn parse_claim(application_name: &str) -> Option<usize> {
    let rest = application_name.strip_prefix(COORDINATOR)?;
    rest.split_once('/')?.0.parse().ok()
}

/// `floor(fraction x usable)`, where usable = max_connections - superuser_reserved_connections.
pub fn budget_connections(max_connections: i64, superuser_reserved: i64, fraction: f64) -> usize {
    let usable = (max_connections - superuser_reserved).max(0) as f64;
    (fraction * usable).floor() as usize
}

/// Each live instance's share of `budget`.
pub fn fair_share(budget: usize, instances: usize) -> usize {
    budget / instances.max(1)
}

/// What one poll saw, for [`next_cap`].
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// This instance's cap before the poll.
    pub cap: usize,
    /// The budget in server connections.
    pub budget: usize,
    /// Live instances, this one included.
    pub instances: usize,
    /// The other live instances' claims.
    pub others: Vec<usize>,
    /// Backends of our upstream users and databases that are not this instance's and not
    /// coordination connections: other instances' servers, and anything no claim covers (a
    /// dead instance's last servers, direct connections).
    pub connected: usize,
    /// This instance's coordination connection is new: others may not have seen it yet.
    pub newcomer: bool,
}

impl Round {
    pub fn fair(&self) -> usize {
        fair_share(self.budget, self.instances)
    }

    /// Room this instance may grow into: the budget less every other instance counted at no
    /// less than a fair share, and less everything connected that is not ours.
    pub fn room(&self) -> usize {
        let fair = self.fair();
        let claimed: usize = self.others.iter().map(|&c| c.max(fair)).sum();
        self.budget
            .saturating_sub(claimed)
            .min(self.budget.saturating_sub(self.connected))
    }
}

/// This instance's cap after a poll: at most its fair share; above it, down to it; below it,
/// up into the room no one else may take; a newcomer keeps what it has (nothing) until every
/// other instance has had a period to see it.
pub fn next_cap(round: &Round) -> usize {
    let fair = round.fair();
    if round.cap >= fair {
        return fair;
    }
    if round.newcomer {
        return round.cap;
    }
    round.cap.max(round.room().min(fair))
}

/// One upstream host's budget as this instance sees it.
pub struct HostBudget {
    /// `host:port`.
    pub addr: String,
    /// Every pool on this host counts its servers against it.
    pub cap: Arc<Cap>,
    view: Mutex<View>,
}

/// What the last poll of a host saw and decided (SHOW BUDGET, `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct View {
    /// At least one poll succeeded.
    pub polled: bool,
    pub max_connections: i64,
    pub superuser_reserved: i64,
    /// The budget in server connections, all instances together.
    pub budget: usize,
    /// Live instances, this one included.
    pub instances: usize,
    /// The fair share of each.
    pub share: usize,
    /// What this instance claims (its cap, or what it still holds when more).
    pub claim: usize,
    /// The other instances' claims, summed.
    pub others_claim: usize,
    /// Backends of our upstream users and databases that are not this instance's.
    pub connected: usize,
    /// Why the last poll failed (the cap is left as it was).
    pub error: Option<String>,
}

impl HostBudget {
    fn new(addr: &str) -> HostBudget {
        HostBudget {
            addr: addr.to_owned(),
            // Nothing until the first polls: a newcomer takes only room no one claims.
            cap: Arc::new(Cap::new("connection_budget", addr, 0)),
            view: Mutex::new(View::default()),
        }
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Every upstream host's budget, by `host:port`.
pub struct Budget {
    /// This instance's id (`instance_id`).
    pub id: String,
    hosts: Mutex<BTreeMap<String, Arc<HostBudget>>>,
}

impl Budget {
    pub fn new(id: &str) -> Budget {
        Budget {
            id: id.to_owned(),
            hosts: Mutex::new(BTreeMap::new()),
        }
    }

    /// The budget of `addr` (`host:port`), made on first use.
    pub fn host(&self, addr: &str) -> Arc<HostBudget> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(HostBudget::new(addr)))
            .clone()
    }

    /// Forgets `addr` (a reload removed its last database); its pools retire on their own.
    pub fn forget(&self, addr: &str) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.remove(addr);
    }

    /// Every host, by address.
    pub fn hosts(&self) -> Vec<Arc<HostBudget>> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(cap: usize, instances: usize, others: &[usize], connected: usize) -> Round {
        Round {
            cap,
            budget: 32,
            instances,
            others: others.to_vec(),
            connected,
            newcomer: false,
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(server_mark("a:1"), "floodgate/a:1");
        let name = coordinator_name(12, "pod-7/x");
        assert_eq!(parse_claim(&name), Some(12));
        assert_eq!(parse_claim("floodgate/a:1"), None);
        assert_eq!(parse_claim("pgbench"), None);
        let longest = coordinator_name(99_999, &"x".repeat(crate::config::MAX_INSTANCE_ID));
        assert!(longest.len() <= 63, "fits in application_name");
    }

    #[test]
    fn budget_is_a_share_of_usable_connections() {
        assert_eq!(budget_connections(50, 3, 0.7), 32);
        assert_eq!(budget_connections(3, 3, 0.7), 0);
        assert_eq!(fair_share(32, 3), 10);
        assert_eq!(fair_share(32, 0), 32);
    }

    #[test]
    fn above_the_fair_share_drops_to_it() {
        assert_eq!(next_cap(&round(10, 4, &[10, 10, 0], 20)), 8);
    }

    #[test]
    fn a_newcomer_waits_a_period_then_takes_only_free_room() {
        let mut r = round(0, 4, &[10, 10, 10], 30);
        r.newcomer = true;
        assert_eq!(next_cap(&r), 0, "not seen by the others yet");
        r.newcomer = false;
        assert_eq!(next_cap(&r), 2, "only what the others leave");
        assert_eq!(next_cap(&round(2, 4, &[8, 8, 8], 24)), 8, "they shrank");
    }

    #[test]
    fn growing_instances_leave_each_other_a_fair_share() {
        // Two below their share at once: each counts the other at 8, so together <= 32.
        let a = next_cap(&round(0, 4, &[8, 8, 0], 16));
        let b = next_cap(&round(0, 4, &[8, 8, 0], 16));
        assert_eq!(a + b + 16, 32);
    }

    #[test]
    fn connections_no_one_claims_hold_growth_back() {
        // A dead instance's servers still connected: counted until they are gone.
        assert_eq!(next_cap(&round(8, 3, &[10, 10], 28)), 8);
        assert_eq!(next_cap(&round(8, 3, &[10, 10], 20)), 10);
    }
}

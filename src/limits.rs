//! Client admission limits: how many clients in all, per database, per user and per client IP,
//! and how fast one IP may open connections (a token bucket with a burst), so one app host in a
//! reconnect storm cannot starve the rest. A refused client gets FATAL 53300 naming the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::General;

/// A limit a client ran into; the message names the setting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitError {
    #[error("no more connections allowed (max_client_conn = {0})")]
    Total(usize),
    #[error("too many connections from {ip} (max_client_conn_per_ip = {max})")]
    PerIp { ip: IpAddr, max: usize },
    #[error(
        "{ip} is opening connections too fast (client_conn_rate_per_ip = {rate}/s, burst {burst})"
    )]
    Rate { ip: IpAddr, rate: f64, burst: f64 },
    #[error("too many connections to database \"{db}\" (max_db_client_connections = {max})")]
    PerDatabase { db: String, max: usize },
    #[error("too many connections for user \"{user}\" (max_user_client_connections = {max})")]
    PerUser { user: String, max: usize },
}

impl LimitError {
    /// The setting that refused the client (the `reason` label in `/metrics`).
    pub fn setting(&self) -> &'static str {
        match self {
            LimitError::Total(_) => "max_client_conn",
            LimitError::PerIp { .. } => "max_client_conn_per_ip",
            LimitError::Rate { .. } => "client_conn_rate_per_ip",
            LimitError::PerDatabase { .. } => "max_db_client_connections",
            LimitError::PerUser { .. } => "max_user_client_connections",
        }
    }
}

/// One client IP's open connections and its rate bucket.
struct IpState {
    open: usize,
    tokens: f64,
    refilled: Instant,
}

/// Counts of admitted clients. Each admission returns a guard that gives its place back on drop.
#[derive(Default)]
pub struct ClientLimits {
    total: Mutex<usize>,
    per_ip: Mutex<HashMap<IpAddr, IpState>>,
    per_db: Mutex<HashMap<String, usize>>,
    per_user: Mutex<HashMap<String, usize>>,
}

/// Which count a guard holds a place in.
enum Place {
    Total,
    Ip(IpAddr),
    Database(String),
    User(String),
}

/// A place taken in one count; released on drop.
pub struct Admitted {
    limits: Arc<ClientLimits>,
    place: Place,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let l = &self.limits;
        match &self.place {
            Place::Total => *lock(&l.total) -= 1,
            Place::Ip(ip) => {
                if let Some(state) = lock(&l.per_ip).get_mut(ip) {
                    state.open -= 1;
                }
            }
            Place::Database(db) => release(&l.per_db, db),
            Place::User(user) => release(&l.per_user, user),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn release(map: &Mutex<HashMap<String, usize>>, key: &str) {
    let mut map = lock(map);
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Takes a place in `map[key]` unless it holds `max` already (0 = no limit).
fn take(map: &Mutex<HashMap<String, usize>>, key: &str, max: usize) -> bool {
    let mut map = lock(map);
    let n = map.entry(key.to_owned()).or_insert(0);
    if max > 0 && *n >= max {
        return false;
    }
    *n += 1;
    true
}

impl ClientLimits {
    /// At accept: `max_client_conn`, then the client IP's count and rate.
    pub fn admit_connection(
        self: &Arc<Self>,
        g: &General,
        ip: IpAddr,
    ) -> Result<Vec<Admitted>, LimitError> {
        {
            let mut total = lock(&self.total);
            if *total >= g.max_client_conn {
                return Err(LimitError::Total(g.max_client_conn));
            }
            *total += 1;
        }
        let mut held = vec![self.guard(Place::Total)];
        if g.max_client_conn_per_ip > 0 || g.client_conn_rate_per_ip > 0.0 {
            self.admit_ip(g, ip)?;
            held.push(self.guard(Place::Ip(ip)));
        }
        Ok(held)
    }

    fn admit_ip(&self, g: &General, ip: IpAddr) -> Result<(), LimitError> {
        let mut per_ip = lock(&self.per_ip);
        if per_ip.len() > 10_000 {
            // Forget idle IPs whose bucket has had time to refill.
            per_ip.retain(|_, s| s.open > 0 || s.refilled.elapsed().as_secs() < 60);
        }
        let burst = g.client_conn_burst_per_ip.max(1) as f64;
        let state = per_ip.entry(ip).or_insert(IpState {
            open: 0,
            tokens: burst,
            refilled: Instant::now(),
        });
        if g.max_client_conn_per_ip > 0 && state.open >= g.max_client_conn_per_ip {
            return Err(LimitError::PerIp {
                ip,
                max: g.max_client_conn_per_ip,
            });
        }
        let rate = g.client_conn_rate_per_ip;
        if rate > 0.0 {
            let now = Instant::now();
            let earned = now.duration_since(state.refilled).as_secs_f64() * rate;
            state.tokens = (state.tokens + earned).min(burst);
            state.refilled = now;
            if state.tokens < 1.0 {
                return Err(LimitError::Rate { ip, rate, burst });
            }
            state.tokens -= 1.0;
        }
        state.open += 1;
        Ok(())
    }

    /// After login: the database's and the user's client counts.
    pub fn admit_login(
        self: &Arc<Self>,
        g: &General,
        db: &str,
        user: &str,
    ) -> Result<Vec<Admitted>, LimitError> {
        let mut held = Vec::new();
        if g.max_db_client_connections > 0 {
            if !take(&self.per_db, db, g.max_db_client_connections) {
                let max = g.max_db_client_connections;
                return Err(LimitError::PerDatabase {
                    db: db.to_owned(),
                    max,
                });
            }
            held.push(self.guard(Place::Database(db.to_owned())));
        }
        if g.max_user_client_connections > 0 {
            if !take(&self.per_user, user, g.max_user_client_connections) {
                let max = g.max_user_client_connections;
                return Err(LimitError::PerUser {
                    user: user.to_owned(),
                    max,
                });
            }
            held.push(self.guard(Place::User(user.to_owned())));
        }
        Ok(held)
    }

    fn guard(self: &Arc<Self>, place: Place) -> Admitted {
        Admitted {
            limits: self.clone(),
            place,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn general(f: impl FnOnce(&mut General)) -> General {
        let mut g = General::default();
        f(&mut g);
        g
    }

    #[test]
    fn per_ip_cap_and_release() {
        let limits = Arc::new(ClientLimits::default());
        let g = general(|g| g.max_client_conn_per_ip = 2);
        let ip: IpAddr = [127, 0, 0, 9].into();
        let a = limits.admit_connection(&g, ip).unwrap();
        let _b = limits.admit_connection(&g, ip).unwrap();
        assert_eq!(
            limits.admit_connection(&g, ip).err(),
            Some(LimitError::PerIp { ip, max: 2 })
        );
        let other: IpAddr = [127, 0, 0, 10].into();
        assert!(
            limits.admit_connection(&g, other).is_ok(),
            "other IPs unaffected"
        );
        drop(a);
        assert!(
            limits.admit_connection(&g, ip).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn rate_bucket_allows_a_burst_then_refuses() {
        let limits = Arc::new(ClientLimits::default());
        let g = general(|g| {
            g.client_conn_rate_per_ip = 0.001; // refills far slower than the test runs
            g.client_conn_burst_per_ip = 3;
        });
        let ip: IpAddr = [127, 0, 0, 11].into();
        for _ in 0..3 {
            drop(limits.admit_connection(&g, ip).unwrap());
        }
        assert!(matches!(
            limits.admit_connection(&g, ip),
            Err(LimitError::Rate { .. })
        ));
    }

    #[test]
    fn database_and_user_counts() {
        let limits = Arc::new(ClientLimits::default());
        let g = general(|g| {
            g.max_db_client_connections = 1;
            g.max_user_client_connections = 2;
        });
        let a = limits.admit_login(&g, "db1", "u").unwrap();
        assert!(matches!(
            limits.admit_login(&g, "db1", "u"),
            Err(LimitError::PerDatabase { .. })
        ));
        let _b = limits.admit_login(&g, "db2", "u").unwrap();
        assert!(matches!(
            limits.admit_login(&g, "db3", "u"),
            Err(LimitError::PerUser { .. })
        ));
        drop(a);
        assert!(limits.admit_login(&g, "db1", "v").is_ok());
    }
}

//! Brute-force lockout: after `auth_failure_limit` failed logins from one IP address within
//! `auth_failure_window`, that address is refused for `auth_failure_ban`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; past it, entries with nothing to remember are dropped.
const MAX_TRACKED: usize = 65_536;

#[derive(Default)]
pub struct Lockout {
    by_ip: Mutex<HashMap<IpAddr, Entry>>,
}

struct Entry {
    failures: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
}

impl Lockout {
    /// How long `ip` stays refused, if it is.
    pub fn banned(&self, ip: IpAddr) -> Option<Duration> {
        let by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let until = by_ip.get(&ip)?.banned_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a failed login from `ip`; `true` when this one starts a ban.
    pub fn failed(&self, ip: IpAddr, limit: usize, window: Duration, ban: Duration) -> bool {
        if limit == 0 {
            return false;
        }
        let now = Instant::now();
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if by_ip.len() >= MAX_TRACKED {
            by_ip.retain(|_, e| {
                e.banned_until.is_some_and(|u| u > now) || now - e.window_start < window
            });
        }
        let entry = by_ip.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            banned_until: None,
        });
        if now - entry.window_start >= window {
            entry.failures = 0;
            entry.window_start = now;
        }
        entry.failures += 1;
        if entry.failures as usize >= limit {
            entry.banned_until = Some(now + ban);
            entry.failures = 0;
            entry.window_start = now;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_after_the_limit_and_expires() {
        let l = Lockout::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let (w, b) = (Duration::from_secs(60), Duration::from_millis(50));
        assert!(!l.failed(ip, 3, w, b));
        assert!(!l.failed(ip, 3, w, b));
        assert!(l.banned(ip).is_none());
        assert!(l.failed(ip, 3, w, b));
        assert!(l.banned(ip).is_some());
        assert!(l.banned(other).is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.banned(ip).is_none());
        assert!(!l.failed(ip, 0, w, b), "0 turns it off");
    }
}

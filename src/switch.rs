//! The kill switch, per database: PAUSE (hold new transactions), DISABLE (refuse new clients)
//! and SHED (fail a share of new transactions at once). One atomic word per database, read once
//! per transaction; everything else happens only while a switch is on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

const PAUSED: u32 = 1 << 8;
const DISABLED: u32 = 1 << 9;
const SHED_MASK: u32 = 0xff;

/// One database's switch.
#[derive(Default)]
pub struct Switch {
    /// Shed percent in the low byte, then the PAUSED and DISABLED bits.
    word: AtomicU32,
    /// Woken when the database is resumed.
    resumed: Notify,
}

/// What a new transaction must do, read in one load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position(u32);

impl Position {
    /// Nothing to do: the common case.
    pub fn is_clear(self) -> bool {
        self.0 & (PAUSED | SHED_MASK) == 0
    }
    pub fn paused(self) -> bool {
        self.0 & PAUSED != 0
    }
    pub fn disabled(self) -> bool {
        self.0 & DISABLED != 0
    }
    pub fn shed_percent(self) -> u8 {
        (self.0 & SHED_MASK) as u8
    }
    /// Whether this transaction is shed (drawn at random, `shed_percent` in 100).
    pub fn sheds(self) -> bool {
        let percent = u32::from(self.shed_percent());
        percent > 0 && (percent >= 100 || rand::random::<u32>() % 100 < percent)
    }
}

impl Switch {
    pub fn position(&self) -> Position {
        Position(self.word.load(Ordering::Acquire))
    }

    pub fn pause(&self) {
        self.word.fetch_or(PAUSED, Ordering::AcqRel);
    }

    pub fn resume(&self) {
        self.word.fetch_and(!PAUSED, Ordering::AcqRel);
        self.resumed.notify_waiters();
    }

    pub fn set_disabled(&self, disabled: bool) {
        match disabled {
            true => self.word.fetch_or(DISABLED, Ordering::AcqRel),
            false => self.word.fetch_and(!DISABLED, Ordering::AcqRel),
        };
    }

    pub fn set_shed(&self, percent: u8) {
        let percent = u32::from(percent.min(100));
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                Some((w & !SHED_MASK) | percent)
            });
    }

    /// Resolves when the database is not paused.
    pub async fn until_resumed(&self) {
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.position().paused() {
                return;
            }
            resumed.await;
        }
    }
}

/// Every database's switch, by the name clients ask for. Kept across reloads.
#[derive(Default)]
pub struct Switches {
    by_db: Mutex<BTreeMap<String, Arc<Switch>>>,
}

impl Switches {
    pub fn get(&self, db: &str) -> Arc<Switch> {
        let mut map = self.by_db.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(db.to_owned()).or_default().clone()
    }
}

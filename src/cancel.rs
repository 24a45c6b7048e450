//! Cancel keys. Each client gets its own BackendKeyData from the proxy; a CancelRequest carrying
//! it is forwarded to the server that client holds at that moment, and dropped otherwise, so a
//! cancel can never reach another client's query.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::server::CancelTarget;

/// What a client's cancel key unlocks: the server it holds right now, if any.
type Slot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, Slot)>>,
}

impl CancelRegistry {
    /// Gives a client a fresh key; the key is forgotten when the returned handle drops.
    pub fn register(self: &Arc<Self>) -> ClientCancel {
        let slot = Slot::default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rand::random::<i32>() & i32::MAX;
            if pid == 0 || clients.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            clients.insert(pid, (secret, slot.clone()));
            return ClientCancel {
                registry: self.clone(),
                pid,
                secret,
                slot,
            };
        }
    }

    /// The server to cancel for this key, if the key is valid and its client holds one.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let (expected, slot) = clients.get(&pid)?;
        if *expected != secret {
            return None;
        }
        *slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One client's key and the server it currently holds.
pub struct ClientCancel {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    slot: Slot,
}

impl ClientCancel {
    /// Called when a server is attached (`Some`) or released (`None`).
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

impl Drop for ClientCancel {
    fn drop(&mut self) {
        let mut clients = self
            .registry
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clients.remove(&self.pid);
    }
}

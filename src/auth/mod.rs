//! Authentication: clients logging in to the proxy (md5, SCRAM-SHA-256 server side) and the proxy
//! logging in to PostgreSQL (upstream).

pub mod client;
pub mod hba;
pub mod lockout;
pub mod md5;
pub mod query;
pub mod scram;
pub mod upstream;
pub mod userlist;

use std::collections::HashMap;

use crate::config::Config;

/// What the proxy knows about one user's password, prepared once at start-up so a login costs no
/// key derivation.
#[derive(Clone)]
pub struct Secrets {
    /// Plain text, when configured so (needed to log in upstream with SCRAM).
    pub plain: Option<String>,
    /// `md5` + hex(md5(password + user)), when known.
    pub md5: Option<String>,
    /// The SCRAM-SHA-256 verifier, when known.
    pub scram: Option<scram::Verifier>,
}

impl Secrets {
    /// Derives what each stored form allows.
    pub fn new(user: &str, password: &str) -> Secrets {
        if md5::is_md5_hash(password) {
            Secrets {
                plain: None,
                md5: Some(password.to_owned()),
                scram: None,
            }
        } else if let Some(verifier) = scram::Verifier::parse(password) {
            Secrets {
                plain: None,
                md5: None,
                scram: Some(verifier),
            }
        } else {
            let secret = postgres_protocol::password::scram_sha_256(password.as_bytes());
            Secrets {
                plain: Some(password.to_owned()),
                md5: Some(md5::hash(password, user)),
                scram: scram::Verifier::parse(&secret),
            }
        }
    }
}

/// Every configured user's secrets, by name.
pub struct UserStore {
    users: HashMap<String, Secrets>,
    /// Random per process: the key unknown users' SCRAM salts are derived from.
    pub mock_secret: [u8; 32],
}

impl UserStore {
    pub fn new(config: &Config) -> UserStore {
        let users = config
            .users
            .iter()
            .map(|u| (u.name.clone(), Secrets::new(&u.name, &u.password)))
            .collect();
        UserStore {
            users,
            mock_secret: process_secret(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Secrets> {
        self.users.get(name)
    }
}

/// A secret drawn once per process: decoy salts for unknown users stay the same across reloads.
fn process_secret() -> [u8; 32] {
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *SECRET.get_or_init(rand::random)
}

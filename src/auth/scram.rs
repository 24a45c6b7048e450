//! SCRAM-SHA-256 (RFC 5802 / 7677), server side, as PostgreSQL speaks it: the user name in the
//! client-first message is ignored (the startup packet's counts) and channel binding is not
//! offered, so a client may send `n` or `y` but never `p`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// A stored SCRAM secret: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Verifier {
    /// Parses the form PostgreSQL stores in `pg_authid`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A verifier nobody can satisfy, for unknown users: the exchange looks the same as for a
    /// real user and fails at the proof. Its salt is derived from the user name and a secret of
    /// this process (as PostgreSQL does), so asking twice gives the same salt, as it would for a
    /// real user: the salt does not tell who exists.
    pub fn impostor(user: &str, process_secret: &[u8; 32]) -> Verifier {
        let salt = hmac(process_secret, user.as_bytes())[..16].to_vec();
        Verifier {
            iterations: 4096,
            salt,
            stored_key: rand::random(),
            server_key: rand::random(),
        }
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key size");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

/// The server's side of one exchange, between the first and the final client message.
pub struct Exchange {
    verifier: Verifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl Exchange {
    /// Takes the client-first message; returns the exchange and the server-first message.
    pub fn start(
        verifier: Verifier,
        client_first: &[u8],
    ) -> Result<(Exchange, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (cb, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        match cb {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (_authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        let gs2_header = format!("{cb},{_authzid},");
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no nonce"))?;
        let nonce = format!("{client_nonce}{}", B64.encode(rand::random::<[u8; 18]>()));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = Exchange {
            verifier,
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final message; returns the server-final message and the client's
    /// ClientKey (recovered from its proof) on success.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        if binding != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof encoding"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: [u8; 32] = std::array::from_fn(|i| proof[i] ^ signature[i]);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !super::md5::constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// What SCRAM pass-through needs to log in upstream as a user stored only as a SCRAM secret:
/// the ClientKey recovered from a client's proof, and the secret it belongs to.
#[derive(Clone)]
pub struct PassThroughKeys {
    pub client_key: [u8; 32],
    pub verifier: Verifier,
}

/// ClientKeys learned from successful client logins, by user (never written anywhere).
#[derive(Default)]
pub struct LearnedKeys {
    by_user: std::sync::Mutex<std::collections::HashMap<String, PassThroughKeys>>,
}

impl LearnedKeys {
    pub fn learn(&self, user: &str, keys: PassThroughKeys) {
        let mut by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        by_user.insert(user.to_owned(), keys);
    }

    pub fn get(&self, user: &str) -> Option<PassThroughKeys> {
        let by_user = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        by_user.get(user).cloned()
    }
}

/// The client side of SCRAM-SHA-256 with a ClientKey instead of a password (pass-through).
pub struct KeyedClient {
    keys: PassThroughKeys,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl KeyedClient {
    pub fn new(keys: PassThroughKeys) -> KeyedClient {
        let nonce = B64.encode(rand::random::<[u8; 18]>());
        KeyedClient {
            keys,
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: None,
        }
    }

    /// The client-first message.
    pub fn first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Takes the server-first message; returns the client-final one. The server must use the
    /// salt and iteration count of the secret the key was learned with.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let attr = |name: &str| {
            text.split(',')
                .find_map(|a| a.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        };
        let nonce = attr("r").ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed(
                "the server's nonce does not extend ours",
            ));
        }
        let salt = attr("s").and_then(|s| B64.decode(s).ok());
        let iterations = attr("i").and_then(|i| i.parse::<u32>().ok());
        if salt.as_deref() != Some(&self.keys.verifier.salt[..])
            || iterations != Some(self.keys.verifier.iterations)
        {
            return Err(ScramError::Malformed(
                "the server's SCRAM secret is not the configured one (salt or iterations differ)",
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac(&self.keys.verifier.stored_key, auth_message.as_bytes());
        let proof: [u8; 32] = std::array::from_fn(|i| self.keys.client_key[i] ^ signature[i]);
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message (the server knows the secret too).
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        let expected = hmac(&self.keys.verifier.server_key, auth_message.as_bytes());
        let text = std::str::from_utf8(server_final).unwrap_or("");
        let given = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
        match super::md5::constant_time_eq(&given, &expected) {
            true => Ok(()),
            false => Err(ScramError::BadProof),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(stored_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&postgres_protocol::password::scram_sha_256(
            stored_password.as_bytes(),
        ))
        .unwrap();
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = Exchange::start(verifier, client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let (server_final, _) = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client verifies the server");
        Ok(())
    }

    #[test]
    fn exchange_with_rust_postgres_client() {
        assert_eq!(run("s3cret", "s3cret"), Ok(()));
        assert_eq!(run("s3cret", "wrong"), Err(ScramError::BadProof));
    }

    /// A key learned from one client's proof logs in against the same secret, and the server's
    /// signature is checked.
    #[test]
    fn pass_through_keys_log_in_with_the_same_secret() {
        let secret = postgres_protocol::password::scram_sha_256(b"s3cret");
        let verifier = Verifier::parse(&secret).unwrap();
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (exchange, server_first) = Exchange::start(verifier.clone(), client.message()).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let (_, client_key) = exchange.finish(client.message()).unwrap();
        let keys = PassThroughKeys {
            client_key,
            verifier: verifier.clone(),
        };
        // The upstream is another server-side exchange with the same secret.
        let mut keyed = KeyedClient::new(keys.clone());
        let (upstream, server_first) =
            Exchange::start(verifier.clone(), keyed.first().as_bytes()).unwrap();
        let client_final = keyed.respond(server_first.as_bytes()).unwrap();
        let (server_final, _) = upstream.finish(client_final.as_bytes()).unwrap();
        keyed.verify(server_final.as_bytes()).unwrap();
        // Another secret (another salt) is refused before any proof is sent.
        let other =
            Verifier::parse(&postgres_protocol::password::scram_sha_256(b"s3cret")).unwrap();
        let mut keyed = KeyedClient::new(keys);
        let (_, server_first) = Exchange::start(other, keyed.first().as_bytes()).unwrap();
        assert!(keyed.respond(server_first.as_bytes()).is_err());
    }

    #[test]
    fn impostor_salt_is_stable_per_user_and_secret() {
        let secret = [7u8; 32];
        let a = Verifier::impostor("ghost", &secret);
        assert_eq!(a.salt, Verifier::impostor("ghost", &secret).salt);
        assert_eq!(a.salt.len(), 16);
        assert_ne!(a.salt, Verifier::impostor("other", &secret).salt);
        assert_ne!(a.salt, Verifier::impostor("ghost", &[8u8; 32]).salt);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let v = Verifier::impostor("x", &[0; 32]);
        assert!(Exchange::start(v.clone(), b"").is_err());
        assert!(Exchange::start(v.clone(), b"p=tls-server-end-point,,n=,r=x").is_err());
        assert!(Exchange::start(v.clone(), b"n,,n=").is_err());
        let (ex, _) = Exchange::start(v, b"n,,n=,r=abc").unwrap();
        assert!(ex.finish(b"c=biws,r=abc,p=!!").is_err());
    }
}

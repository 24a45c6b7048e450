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

    /// Checks the client-final message; returns the server-final message on success.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
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
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !super::md5::constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
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
        let server_final = exchange.finish(client.message())?;
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

//! Clients logging in to the proxy: trust, md5 or SCRAM-SHA-256 against `[[users]]`. Unknown
//! users go through the same exchange as known ones and get the same answer as a wrong password.

use crate::stream::Stream;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::client::ClientError;
use crate::config::AuthType;
use crate::protocol::backend;
use crate::protocol::frame;
use crate::shared::Shared;

/// Largest message accepted before login completes (password, SASL).
const MAX_LOGIN_MESSAGE: usize = 10 * 1024;

/// Checks the client's password as `auth_type` says. Unknown users go through the same exchange
/// and get the same answer as a wrong password.
pub async fn authenticate(
    stream: &mut Stream,
    shared: &Shared,
    user: &str,
    auth_type: AuthType,
    looked_up: Option<&crate::auth::Secrets>,
) -> Result<(), ClientError> {
    let users = shared.users();
    let secrets = users.get(user).or(looked_up);
    let mut buf = BytesMut::new();
    match auth_type {
        AuthType::Trust => {
            if secrets.is_none() {
                return Err(ClientError::BadPassword(user.to_owned()));
            }
            Ok(())
        }
        AuthType::Md5 => {
            let salt: [u8; 4] = rand::random();
            backend::auth_md5(&mut buf, salt);
            stream.write_all(&buf).await?;
            let answer = read_password_message(stream, &mut buf).await?;
            let mut pos = 0;
            let answer = frame::cstr(&answer, &mut pos).unwrap_or_default();
            let expected = secrets
                .and_then(|s| s.md5.as_deref())
                .map(|stored| crate::auth::md5::expected_response(stored, salt));
            match expected {
                Some(e) if crate::auth::md5::constant_time_eq(e.as_bytes(), answer.as_bytes()) => {
                    Ok(())
                }
                _ => Err(ClientError::BadPassword(user.to_owned())),
            }
        }
        AuthType::ScramSha256 => {
            use crate::auth::scram::{Exchange, Verifier};
            let verifier = secrets.and_then(|s| s.scram.clone());
            let known = verifier.is_some();
            backend::auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
            stream.write_all(&buf).await?;
            let initial = read_password_message(stream, &mut buf).await?;
            let client_first = parse_sasl_initial(&initial)?;
            let verifier = verifier.unwrap_or_else(|| Verifier::impostor(user, &users.mock_secret));
            let (exchange, server_first) = Exchange::start(verifier, client_first)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            buf.clear();
            backend::auth_sasl_continue(&mut buf, server_first.as_bytes());
            stream.write_all(&buf).await?;
            let client_final = read_password_message(stream, &mut buf).await?;
            match exchange.finish(&client_final) {
                Ok((server_final, client_key)) if known => {
                    // A user stored only as a SCRAM secret: its key is what logs in upstream.
                    if let Some(s) = secrets.filter(|s| s.plain.is_none())
                        && let Some(verifier) = s.scram.clone()
                    {
                        let keys = crate::auth::scram::PassThroughKeys {
                            client_key,
                            verifier,
                        };
                        shared.learned_keys.learn(user, keys);
                    }
                    buf.clear();
                    backend::auth_sasl_final(&mut buf, server_final.as_bytes());
                    stream.write_all(&buf).await?;
                    Ok(())
                }
                Ok(_) | Err(crate::auth::scram::ScramError::BadProof) => {
                    Err(ClientError::BadPassword(user.to_owned()))
                }
                Err(e) => Err(ClientError::Protocol(e.to_string())),
            }
        }
    }
}

/// Reads a PasswordMessage ('p': password, SASLInitialResponse or SASLResponse) body.
async fn read_password_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, ClientError> {
    match frame::read_message(stream, buf, MAX_LOGIN_MESSAGE).await? {
        Some(b'p') => Ok(buf.split()),
        Some(tag) => Err(ClientError::Protocol(format!(
            "expected a password message, got message type '{}'",
            tag as char
        ))),
        None => Err(ClientError::Gone),
    }
}

/// SASLInitialResponse: mechanism name, then the length-prefixed client-first message.
fn parse_sasl_initial(body: &[u8]) -> Result<&[u8], ClientError> {
    let bad = || ClientError::Protocol("malformed SASLInitialResponse".into());
    let mut pos = 0;
    let mechanism = frame::cstr(body, &mut pos).ok_or_else(bad)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(ClientError::Protocol(format!(
            "client selected an invalid SASL authentication mechanism: {mechanism}"
        )));
    }
    let len = body.get(pos..pos + 4).ok_or_else(bad)?;
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let data = body.get(pos + 4..).ok_or_else(bad)?;
    if len < 0 || len as usize != data.len() {
        return Err(bad());
    }
    Ok(data)
}

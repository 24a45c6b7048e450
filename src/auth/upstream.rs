//! The proxy logging in to PostgreSQL: startup, then trust, cleartext, md5 or SCRAM-SHA-256,
//! then the parameters and key the server reports. Server messages are parsed with
//! postgres-protocol's checked parser.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::UpstreamError;

/// How to log in to one upstream database.
#[derive(Clone)]
pub struct Login {
    /// Sent as a startup parameter (`floodgate/<instance id>`): the server's default, so a
    /// RESET returns to it ([`crate::budget`]).
    pub application_name: Option<String>,
    pub addr: String,
    pub user: String,
    pub dbname: String,
    /// Plain text or a stored md5 hash (`md5...`, only usable when the server asks for md5).
    pub password: Option<String>,
    /// The `[databases.NAME]` key, for error messages.
    pub db_key: String,
    /// With no plain-text password, SCRAM uses the key learned from the user's own login.
    pub learned_keys: Option<std::sync::Arc<crate::auth::scram::LearnedKeys>>,
    /// `server_tls_sslmode` and the TLS client to use.
    pub tls: crate::tls::Upstream,
}

/// What the server told us during login.
pub struct LoggedIn {
    pub params: Vec<(String, String)>,
    pub pid: i32,
    pub secret: i32,
}

/// Most ParameterStatus messages a login may carry.
const MAX_LOGIN_PARAMETERS: usize = 256;

/// Runs the login on a connected socket.
pub async fn login(
    stream: &mut crate::stream::Stream,
    login: &Login,
) -> Result<LoggedIn, UpstreamError> {
    let mut out = BytesMut::new();
    let params = [
        ("user", login.user.as_str()),
        ("database", login.dbname.as_str()),
    ];
    let named = login
        .application_name
        .as_deref()
        .map(|n| ("application_name", n));
    frontend::startup_message(params.iter().copied().chain(named), &mut out)?;
    stream.write_all(&out).await?;
    let mut inbuf = BytesMut::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    let mut keyed: Option<crate::auth::scram::KeyedClient> = None;
    let mut done = LoggedIn {
        params: Vec::new(),
        pid: 0,
        secret: 0,
    };
    loop {
        out.clear();
        match next(stream, &mut inbuf, login).await? {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                let pw = plain_password(login)?;
                frontend::password_message(pw.as_bytes(), &mut out)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let response = match login.password.as_deref() {
                    Some(stored) if crate::auth::md5::is_md5_hash(stored) => {
                        crate::auth::md5::expected_response(stored, body.salt())
                    }
                    _ => postgres_protocol::authentication::md5_hash(
                        login.user.as_bytes(),
                        plain_password(login)?.as_bytes(),
                        body.salt(),
                    ),
                };
                frontend::password_message(response.as_bytes(), &mut out)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut offered = false;
                while let Some(m) = mechanisms.next().map_err(|e| protocol(login, e))? {
                    offered |= m == SCRAM_SHA_256;
                }
                if !offered {
                    return Err(unsupported(login, "SASL without SCRAM-SHA-256"));
                }
                if plain_password(login).is_err()
                    && let Some(keys) = login.learned_keys.as_ref().and_then(|k| k.get(&login.user))
                {
                    // SCRAM pass-through: no password stored, the key from the user's login.
                    let client = crate::auth::scram::KeyedClient::new(keys);
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        client.first().as_bytes(),
                        &mut out,
                    )?;
                    keyed = Some(client);
                } else {
                    let client = ScramSha256::new(
                        plain_password(login)?.as_bytes(),
                        ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out)?;
                    scram = Some(client);
                }
            }
            Message::AuthenticationSaslContinue(body) if keyed.is_some() => {
                check_server_first(body.data()).map_err(|e| protocol(login, e))?;
                let client = keyed
                    .as_mut()
                    .ok_or_else(|| protocol(login, "unexpected SASL"))?;
                let response = client
                    .respond(body.data())
                    .map_err(|e| protocol(login, e))?;
                frontend::sasl_response(response.as_bytes(), &mut out)?;
            }
            Message::AuthenticationSaslFinal(body) if keyed.is_some() => {
                let client = keyed
                    .as_ref()
                    .ok_or_else(|| protocol(login, "unexpected SASL"))?;
                client.verify(body.data()).map_err(|e| protocol(login, e))?;
            }
            Message::AuthenticationSaslContinue(body) => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| protocol(login, "unexpected SASL"))?;
                check_server_first(body.data()).map_err(|e| protocol(login, e))?;
                client.update(body.data()).map_err(|e| protocol(login, e))?;
                frontend::sasl_response(client.message(), &mut out)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| protocol(login, "unexpected SASL"))?;
                client.finish(body.data()).map_err(|e| protocol(login, e))?;
            }
            Message::AuthenticationKerberosV5 => return Err(unsupported(login, "Kerberos")),
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                return Err(unsupported(login, "GSSAPI"));
            }
            Message::AuthenticationSspi => return Err(unsupported(login, "SSPI")),
            Message::AuthenticationScmCredential => return Err(unsupported(login, "SCM")),
            Message::ParameterStatus(body) => {
                // PostgreSQL reports about fifteen; a server sending without end is hostile.
                if done.params.len() >= MAX_LOGIN_PARAMETERS {
                    return Err(protocol(
                        login,
                        "too many ParameterStatus messages at login",
                    ));
                }
                let name = body.name().map_err(|e| protocol(login, e))?;
                let value = body.value().map_err(|e| protocol(login, e))?;
                done.params.push((name.to_owned(), value.to_owned()));
            }
            Message::BackendKeyData(body) => {
                done.pid = body.process_id();
                done.secret = body.secret_key();
            }
            Message::NoticeResponse(_) => {}
            Message::ReadyForQuery(_) => return Ok(done),
            Message::ErrorResponse(body) => return Err(refused(login, &body)),
            _ => return Err(protocol(login, "unexpected message during login")),
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
    }
}

/// Reads the next whole server message.
async fn next(
    stream: &mut crate::stream::Stream,
    inbuf: &mut BytesMut,
    login: &Login,
) -> Result<Message, UpstreamError> {
    loop {
        if let Some(msg) = Message::parse(inbuf).map_err(|e| protocol(login, e))? {
            return Ok(msg);
        }
        if inbuf.len() > 1 << 20 {
            return Err(protocol(login, "login message larger than 1 MiB"));
        }
        if stream.read_buf(inbuf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

fn plain_password(login: &Login) -> Result<&str, UpstreamError> {
    match login.password.as_deref() {
        Some(pw) if !crate::auth::md5::is_md5_hash(pw) => Ok(pw),
        _ => Err(UpstreamError::NoPassword {
            user: login.user.clone(),
            db: login.db_key.clone(),
        }),
    }
}

/// Most PBKDF2 iterations an upstream may ask for (PostgreSQL's default is 4,096): a hostile or
/// misconfigured server must not make every login burn seconds of CPU.
const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

/// Longest server-first message accepted (nonce, salt and count are a few hundred bytes).
const MAX_SERVER_FIRST: usize = 4096;

/// Checks the server-first message's size and iteration count before any key is derived.
fn check_server_first(data: &[u8]) -> Result<(), String> {
    if data.len() > MAX_SERVER_FIRST {
        return Err(format!(
            "SCRAM server-first message of {} bytes (at most {MAX_SERVER_FIRST})",
            data.len()
        ));
    }
    let text = std::str::from_utf8(data).map_err(|_| "SCRAM server-first is not UTF-8")?;
    let iterations = text
        .split(',')
        .find_map(|attr| attr.strip_prefix("i="))
        .ok_or("SCRAM server-first without an iteration count")?;
    match iterations.parse::<u32>() {
        Ok(n) if (1..=MAX_SCRAM_ITERATIONS).contains(&n) => Ok(()),
        _ => Err(format!(
            "SCRAM iteration count {iterations} refused (at most {MAX_SCRAM_ITERATIONS})"
        )),
    }
}

fn protocol(login: &Login, detail: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Protocol {
        addr: login.addr.clone(),
        detail: detail.to_string(),
    }
}

fn unsupported(login: &Login, method: &'static str) -> UpstreamError {
    UpstreamError::UnsupportedAuth {
        addr: login.addr.clone(),
        method,
    }
}

/// The server's refusal, with its SQLSTATE and reason.
fn refused(
    login: &Login,
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> UpstreamError {
    let (code, message) = crate::params::error_fields(body);
    UpstreamError::Refused {
        addr: login.addr.clone(),
        code,
        message,
    }
}

#[cfg(test)]
mod scram_limits {
    #[test]
    fn absurd_server_first_messages_are_refused() {
        assert!(super::check_server_first(b"r=abc,s=c2FsdA==,i=4096").is_ok());
        assert!(super::check_server_first(b"r=abc,s=c2FsdA==,i=999999999").is_err());
        assert!(super::check_server_first(b"r=abc,s=c2FsdA==,i=0").is_err());
        assert!(super::check_server_first(b"r=abc,s=c2FsdA==").is_err());
        assert!(super::check_server_first(&[b'r'; 5000]).is_err());
    }
}

//! The admin console: a virtual database (`floodgate`, or `pgbouncer` for existing scripts and
//! tools) that answers PgBouncer's console commands over the simple query protocol.
//! `admin_users` may run everything, `stats_users` only SHOW.

pub mod actions;
pub mod budget;
pub mod show;
pub mod table;

use std::sync::Arc;

use crate::stream::Stream;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::protocol::backend::{self, Severity};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::protocol::sqlstate;
use crate::shared::{Shared, StopMode};
use actions::ActionError;
use show::StatsView;

/// Database names that reach the console.
pub const DATABASES: [&str; 2] = ["floodgate", "pgbouncer"];

/// Largest message the console reads.
const MAX_MESSAGE: usize = 64 * 1024;

pub fn is_console(database: &str) -> bool {
    DATABASES.contains(&database)
}

/// What a console user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    /// SHOW only.
    Stats,
}

/// The role of `user` on the console, if any.
pub fn role(shared: &Shared, user: &str) -> Option<Role> {
    let config = shared.config();
    let g = &config.floodgate;
    if g.admin_users.iter().any(|u| u == user) {
        Some(Role::Admin)
    } else if g.stats_users.iter().any(|u| u == user) {
        Some(Role::Stats)
    } else {
        None
    }
}

/// An error for the console user; the session goes on.
struct Refusal {
    code: &'static str,
    message: String,
}

impl From<ActionError> for Refusal {
    fn from(e: ActionError) -> Self {
        Refusal {
            code: e.sqlstate(),
            message: e.to_string(),
        }
    }
}

fn refusal(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// Serves a logged-in console user until it leaves. `greeting` holds what follows
/// authentication (AuthenticationOk first).
pub async fn serve(stream: &mut Stream, shared: Arc<Shared>, user: &str, role: Role) {
    let mut out = BytesMut::new();
    backend::auth_ok(&mut out);
    let version = format!("{}/floodgate", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("IntervalStyle", "postgres"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("is_superuser", "off"),
        ("application_name", ""),
    ] {
        backend::parameter_status(&mut out, name, value);
    }
    backend::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    // After an error in an extended-protocol message, everything up to Sync is skipped (as
    // PostgreSQL does), so a driver that tries it gets one clear error, not a hang.
    let mut skipping = false;
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let read = tokio::select! {
            read = read_message(stream) => read,
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                out.clear();
                let message = "floodgate is shutting down";
                backend::error(&mut out, Severity::Fatal, sqlstate::ADMIN_SHUTDOWN, message);
                let _ = stream.write_all(&out).await;
                return;
            }
        };
        let (tag, body) = match read {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(e) => {
                out.clear();
                backend::error(&mut out, Severity::Fatal, sqlstate::PROTOCOL_VIOLATION, &e);
                let _ = stream.write_all(&out).await;
                return;
            }
        };
        out.clear();
        match tag {
            b'X' => return,
            b'Q' => {
                let sql = body.strip_suffix(&[0]).unwrap_or(&body);
                let sql = String::from_utf8_lossy(sql);
                tracing::debug!(%user, command = %sql, "console");
                if let Err(e) = run(&shared, role, &sql, &mut out).await {
                    out.clear();
                    backend::error(&mut out, Severity::Error, e.code, &e.message);
                }
                backend::ready_for_query(&mut out, b'I');
            }
            b'S' => {
                skipping = false;
                backend::ready_for_query(&mut out, b'I');
            }
            b'H' => {}
            b'P' | b'B' | b'D' | b'E' | b'C' | b'F' | b'd' | b'c' | b'f' => {
                if !skipping {
                    skipping = true;
                    backend::error(
                        &mut out,
                        Severity::Error,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console accepts only simple queries (the extended query \
                         protocol is not supported): use psql, or your driver's simple query mode",
                    );
                }
            }
            other => {
                let message = format!("invalid frontend message type '{}'", other as char);
                backend::error(
                    &mut out,
                    Severity::Fatal,
                    sqlstate::PROTOCOL_VIOLATION,
                    &message,
                );
                let _ = stream.write_all(&out).await;
                return;
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// One message: `None` at the end of the stream.
async fn read_message(stream: &mut Stream) -> Result<Option<(u8, Vec<u8>)>, String> {
    let mut head = [0u8; HEADER_LEN];
    match stream.read_exact(&mut head).await {
        Ok(_) => {}
        Err(_) => return Ok(None),
    }
    let (tag, len) = frame::header(&head, MAX_MESSAGE)
        .map_err(|e| e.to_string())?
        .ok_or("truncated message")?;
    let mut body = vec![0; len];
    if stream.read_exact(&mut body).await.is_err() {
        return Ok(None);
    }
    Ok(Some((tag, body)))
}

/// The words of a console command as the console reads them (for property tests).
pub fn command_words(sql: &str) -> Result<Vec<String>, String> {
    words(sql).map_err(|r| r.message)
}

/// Splits a command into words: bare words (commands are matched without regard to case),
/// double-quoted names (kept as written), single-quoted strings, `=`.
fn words(sql: &str) -> Result<Vec<String>, Refusal> {
    let mut words = Vec::new();
    let mut chars = sql.trim().trim_end_matches(';').trim().chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' || c == '\'' {
            chars.next();
            let mut word = String::new();
            loop {
                match chars.next() {
                    Some(q) if q == c && chars.peek() == Some(&c) => {
                        chars.next();
                        word.push(c);
                    }
                    Some(q) if q == c => break,
                    Some(other) => word.push(other),
                    None => return Err(refusal(sqlstate::SYNTAX_ERROR, "unterminated quote")),
                }
            }
            words.push(word);
        } else if c == '=' {
            chars.next();
            words.push("=".into());
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '=' || c == '"' || c == '\'' {
                    break;
                }
                if c == ';' {
                    return Err(refusal(
                        sqlstate::SYNTAX_ERROR,
                        "one console command per query, please",
                    ));
                }
                word.push(c);
                chars.next();
            }
            words.push(word);
        }
    }
    Ok(words)
}

const HELP: &str = "\
SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|LISTS|STATE|MEM|VERSION|BUDGET
SET key = arg
RELOAD
PAUSE [<db>]
RESUME [<db>]
DISABLE <db>
ENABLE <db>
SHED <db> <percent>      (0 ends it)
KILL [<db>]
KILL_CLIENT <id>
RECONNECT [<db>]
WAIT_CLOSE [<db>]
SHUTDOWN [WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS]";

/// Runs one console command, writing its result into `out`.
async fn run(
    shared: &Arc<Shared>,
    role: Role,
    sql: &str,
    out: &mut BytesMut,
) -> Result<(), Refusal> {
    let words = words(sql)?;
    let Some(command) = words.first().map(|w| w.to_ascii_uppercase()) else {
        table::empty_query(out);
        return Ok(());
    };
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    if command == "SHOW" {
        return show(shared, &args, out);
    }
    if role != Role::Admin {
        return Err(refusal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("permission denied for {command}: stats_users may only run SHOW commands"),
        ));
    }
    let db = || args.first().copied();
    let one_db = || match args.as_slice() {
        [db] => Ok(*db),
        _ => Err(refusal(
            sqlstate::SYNTAX_ERROR,
            format!("{command} takes one database name"),
        )),
    };
    let at_most_one = || match args.len() {
        0 | 1 => Ok(()),
        _ => Err(refusal(
            sqlstate::SYNTAX_ERROR,
            format!("{command} takes at most one database name"),
        )),
    };
    match command.as_str() {
        "PAUSE" => {
            at_most_one()?;
            actions::pause(shared, db()).await?;
        }
        "RESUME" => {
            at_most_one()?;
            actions::resume(shared, db())?;
        }
        "DISABLE" => actions::set_disabled(shared, one_db()?, true)?,
        "ENABLE" => actions::set_disabled(shared, one_db()?, false)?,
        "SHED" => {
            let [db, percent] = args.as_slice() else {
                return Err(refusal(
                    sqlstate::SYNTAX_ERROR,
                    "SHED takes a database name and a percentage: SHED app 30 (SHED app 0 ends it)",
                ));
            };
            let percent: u8 = percent.trim_end_matches('%').parse().map_err(|_| {
                refusal(
                    sqlstate::SYNTAX_ERROR,
                    format!("SHED takes a percentage from 0 to 100, not {percent}"),
                )
            })?;
            actions::shed(shared, Some(db), percent)?;
        }
        "KILL" => {
            at_most_one()?;
            actions::kill(shared, db())?;
            table::notice(out, "killed: the database stays paused until RESUME", None);
        }
        "KILL_CLIENT" => {
            let [id] = args.as_slice() else {
                return Err(refusal(
                    sqlstate::SYNTAX_ERROR,
                    "KILL_CLIENT takes a client id (SHOW CLIENTS, column id)",
                ));
            };
            actions::kill_client(shared, id)?;
        }
        "RECONNECT" => {
            at_most_one()?;
            actions::reconnect(shared, db())?;
        }
        "WAIT_CLOSE" => {
            at_most_one()?;
            actions::wait_close(shared, db()).await?;
        }
        "SHUTDOWN" => {
            let mode = match args.as_slice() {
                [] => StopMode::Fast,
                [m] if m.eq_ignore_ascii_case("wait_for_servers") => StopMode::WaitForServers,
                [m] if m.eq_ignore_ascii_case("wait_for_clients") => StopMode::WaitForClients,
                _ => {
                    return Err(refusal(
                        sqlstate::SYNTAX_ERROR,
                        "SHUTDOWN takes nothing, WAIT_FOR_SERVERS or WAIT_FOR_CLIENTS",
                    ));
                }
            };
            actions::shutdown(shared, mode);
        }
        "RELOAD" => {
            if !args.is_empty() {
                return Err(refusal(sqlstate::SYNTAX_ERROR, "RELOAD takes no arguments"));
            }
            let notes = shared
                .reload()
                .map_err(|e| refusal(sqlstate::CONFIG_FILE_ERROR, e))?;
            for note in notes {
                table::notice(out, &note, None);
            }
        }
        "SET" => return set(shared, &args, out),
        "SUSPEND" | "SELECT" | "BEGIN" | "COMMIT" | "ROLLBACK" => {
            return Err(refusal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "{command} is not supported by the Floodgate console; SHOW HELP lists what is"
                ),
            ));
        }
        _ => {
            return Err(refusal(
                sqlstate::SYNTAX_ERROR,
                format!("invalid command '{}', use SHOW HELP;", sql.trim()),
            ));
        }
    }
    table::command_complete(out, &command);
    Ok(())
}

fn show(shared: &Shared, args: &[&str], out: &mut BytesMut) -> Result<(), Refusal> {
    let [what] = args else {
        return Err(refusal(
            sqlstate::SYNTAX_ERROR,
            "SHOW takes one word, e.g. SHOW POOLS; SHOW HELP lists them",
        ));
    };
    match what.to_ascii_uppercase().as_str() {
        "HELP" => {
            table::notice(out, "Console usage", Some(HELP));
            table::command_complete(out, "SHOW");
        }
        "POOLS" => show::pools(shared, out),
        "BUDGET" => budget::show(shared, out),
        "STATS" => show::stats(shared, StatsView::All, out),
        "STATS_TOTALS" => show::stats(shared, StatsView::Totals, out),
        "STATS_AVERAGES" => show::stats(shared, StatsView::Averages, out),
        "TOTALS" => show::totals(shared, out),
        "CLIENTS" => show::clients(shared, out),
        "SERVERS" => show::servers(shared, out),
        "DATABASES" => show::databases(shared, out),
        "USERS" => show::users(shared, out),
        "CONFIG" => show::config(shared, out),
        "LISTS" => show::lists(shared, out),
        "STATE" => show::state(shared, out),
        "MEM" => show::mem(shared, out),
        "VERSION" => show::version(out),
        "FDS" | "SOCKETS" | "ACTIVE_SOCKETS" | "DNS_HOSTS" | "DNS_ZONES" | "PEERS"
        | "PEER_POOLS" => {
            return Err(refusal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("SHOW {what} is not supported by Floodgate; SHOW HELP lists what is"),
            ));
        }
        _ => {
            return Err(refusal(
                sqlstate::SYNTAX_ERROR,
                format!("unknown SHOW item '{what}'; SHOW HELP lists them"),
            ));
        }
    }
    Ok(())
}

/// SET key = value: a `[floodgate]` setting changed at run time, as if reloaded (until the next
/// RELOAD reads the file again).
fn set(shared: &Shared, args: &[&str], out: &mut BytesMut) -> Result<(), Refusal> {
    let (key, value) = match args {
        [key, "=", value] => (*key, *value),
        [key, to, value] if to.eq_ignore_ascii_case("to") => (*key, *value),
        _ => {
            return Err(refusal(
                sqlstate::SYNTAX_ERROR,
                "SET takes key = value, e.g. SET default_pool_size = 50",
            ));
        }
    };
    let key = key.to_ascii_lowercase();
    let config = shared
        .config()
        .with_setting(&key, value)
        .map_err(|e| refusal(sqlstate::INVALID_PARAMETER_VALUE, e.to_string()))?;
    shared
        .stats
        .telemetry
        .reloads
        .with_label_values(&["ok"])
        .inc();
    for note in shared.apply(config) {
        table::notice(out, &note, None);
    }
    table::command_complete(out, "SET");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn words_fold_case_and_keep_quotes() {
        let w = super::words("  set Query_Wait_Timeout = '5s' ; ")
            .ok()
            .unwrap();
        assert_eq!(w, ["set", "Query_Wait_Timeout", "=", "5s"]);
        let w = super::words("PAUSE \"My Db\"").ok().unwrap();
        assert_eq!(w, ["PAUSE", "My Db"]);
        assert!(super::words("SHOW POOLS; SHOW STATS").is_err());
    }
}

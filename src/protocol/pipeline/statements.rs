//! Named prepared statements in transaction mode: how the tracker rewrites a client's Parse,
//! Bind, Describe, Close and SQL `DEALLOCATE` so that its names map to statements the server it
//! holds has (preparing them there first when needed), answers what the server need not see,
//! and has the server fail where PostgreSQL would have failed the client's own message.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::{ClientAction, Expect, Synthetic, Tracker, Undo, declared_body_len};
use crate::protocol::frame::{HEADER_LEN, cstr};
use crate::protocol::prepared::{Statement, deallocate_target, put_message};
use crate::protocol::sql::Leftovers;

impl Tracker<'_> {
    pub(super) fn parse(&mut self, msg: &[u8], body: &[u8], status: u8) -> ClientAction {
        let mut pos = 0;
        let Some(name) = cstr(body, &mut pos) else {
            // Malformed (or a name longer than what is held): the server answers.
            let undo = Undo::Nothing;
            let expect = Expect::Parse {
                swallow: false,
                undo,
            };
            return self.push(expect, ClientAction::Forward);
        };
        if !name.is_empty() && declared_body_len(msg) > body.len() {
            // Too long to keep: it passes through under the client's name and lives on this
            // server only, like an SQL PREPARE, so the server drops it before reuse.
            self.may_leave(Leftovers::PREPARED);
            self.unread_sql = true;
        }
        if name.is_empty() || declared_body_len(msg) > body.len() {
            let undo = Undo::Nothing;
            return self.push(
                Expect::Parse {
                    swallow: false,
                    undo,
                },
                ClientAction::Forward,
            );
        }
        if self.client.names.contains_key(name) {
            return self.already_exists(name, &body[pos..]);
        }
        if self.client.full() {
            let message = format!(
                "too many prepared statements on this connection (max_client_prepared_statements \
                 = {}): close some (Close, or DEALLOCATE) before preparing more",
                self.client.max
            );
            return self.raise(CONFIGURATION_LIMIT, &message, "floodgate", "parse");
        }
        let Some(statement) = self.registry.statement(&body[pos..]) else {
            let message = "the proxy's memory for prepared statements is full \
                           (max_prepared_statement_bytes); close statements no longer used, or \
                           use unnamed statements";
            return self.raise(CONFIGURATION_LIMIT, message, "floodgate", "parse");
        };
        self.may_leave(statement.leftovers);
        let name: Arc<str> = name.into();
        self.client.names.insert(name.clone(), statement.clone());
        if status == b'E' {
            // In a failed transaction PostgreSQL refuses the Parse (unless it is COMMIT or
            // ROLLBACK): let it judge.
            self.check_text(&body[pos..], false, Undo::Unmap(name));
            return ClientAction::Replace;
        }
        if self.server.has(statement.id) {
            self.registry.counters.hits.fetch_add(1, Ordering::Relaxed);
            let undo = Undo::Unmap(name);
            let response = Synthetic::ParseComplete;
            return self.push(Expect::Synthetic { response, undo }, ClientAction::Replace);
        }
        self.prepare_on_server(&statement, false);
        let undo = Undo::UnmapAndForget(name, statement.id);
        self.push(
            Expect::Parse {
                swallow: false,
                undo,
            },
            ClientAction::Replace,
        )
    }

    /// Adds `s`'s Parse to `out`, evicting (Close) the least recently used statement if the
    /// server is full; `swallow` the ParseComplete when the client did not ask for it.
    fn prepare_on_server(&mut self, s: &Arc<Statement>, swallow: bool) {
        if let Some(old) = self.server.insert(s, self.max) {
            self.registry
                .counters
                .evictions
                .fetch_add(1, Ordering::Relaxed);
            let name = self.registry.name_of(old.0);
            put_message(self.out, b'C', &[b"S", name.as_bytes(), b"\0"]);
            let undo = Undo::Keep(old);
            self.push(
                Expect::Close {
                    swallow: true,
                    undo,
                },
                ClientAction::Forward,
            );
        }
        self.registry
            .counters
            .prepared
            .fetch_add(1, Ordering::Relaxed);
        self.out.extend_from_slice(&s.parse);
        if swallow {
            self.push(
                Expect::Parse {
                    swallow: true,
                    undo: Undo::Forget(s.id),
                },
                ClientAction::Forward,
            );
        }
    }

    /// Re-Parse of a name without Close: the server raises 42P05 itself, so the transaction
    /// fails and the batch is skipped exactly as PostgreSQL would. PostgreSQL checks the text
    /// first (a syntax error, or 25P02 in a failed transaction, wins over the duplicate): the
    /// text is parsed as an unnamed statement before the error is raised.
    fn already_exists(&mut self, name: &str, query_and_types: &[u8]) -> ClientAction {
        self.check_text(query_and_types, true, Undo::Nothing);
        let message = format!("prepared statement \"{name}\" already exists");
        self.raise("42P05", &message, "prepare.c", "StorePreparedStatement")
    }

    /// Has the server fail in place of the current client message, so that the transaction
    /// fails and the batch is skipped exactly as PostgreSQL does after an error of its own; the
    /// client gets the error PostgreSQL would have sent (`code`, `message`, and the source
    /// `file` and `routine`, which some drivers look at: asyncpg recognises a stale plan by
    /// its routine).
    fn raise(&mut self, code: &str, message: &str, file: &str, routine: &str) -> ClientAction {
        let mut error = BytesMut::new();
        put_message(
            &mut error,
            b'E',
            &[
                b"SERROR\0VERROR\0C",
                code.as_bytes(),
                b"\0M",
                message.as_bytes(),
                b"\0F",
                file.as_bytes(),
                b"\0R",
                routine.as_bytes(),
                b"\0\0",
            ],
        );
        // A Bind of a statement that does not exist fails before it touches any portal or
        // statement (in a failed transaction too), so nothing of the client's is disturbed.
        let missing = self.registry.reserved_name("missing");
        put_message(self.out, b'B', &[b"\0", missing.as_bytes(), b"\0", &[0; 6]]);
        let error = error.to_vec().into_boxed_slice();
        self.push(Expect::Raised { error }, ClientAction::Replace)
    }

    /// Has the server judge a Parse's text (syntax; a failed transaction refuses all but
    /// COMMIT and ROLLBACK) under a name of the proxy's, closed at once: the client's unnamed
    /// statement is left alone. The client gets the ParseComplete unless `swallow`.
    fn check_text(&mut self, query_and_types: &[u8], swallow: bool, undo: Undo) {
        let check = self.registry.reserved_name("check");
        put_message(self.out, b'P', &[check.as_bytes(), b"\0", query_and_types]);
        self.push(Expect::Parse { swallow, undo }, ClientAction::Forward);
        put_message(self.out, b'C', &[b"S", check.as_bytes(), b"\0"]);
        let close = Expect::Close {
            swallow: true,
            undo: Undo::Nothing,
        };
        self.push(close, ClientAction::Forward);
    }

    pub(super) fn bind(&mut self, msg: &[u8], body: &[u8]) -> ClientAction {
        let mut pos = 0;
        let (Some(portal), Some(name)) = (cstr(body, &mut pos), cstr(body, &mut pos)) else {
            // Malformed (or names longer than what is held): the server answers.
            let expect = Expect::Bind {
                swallow: false,
                statement: 0,
                client: None,
            };
            return self.push(expect, ClientAction::Forward);
        };
        let Some((client, statement)) = self.client.names.get_key_value(name) else {
            // Unnamed, or unknown: the server answers as PostgreSQL would (26000).
            let expect = Expect::Bind {
                swallow: false,
                statement: 0,
                client: None,
            };
            return self.push(expect, ClientAction::Forward);
        };
        let (client, statement) = (client.clone(), statement.clone());
        self.may_leave(statement.leftovers);
        if let Some(refused) = self.refuse_superseded(&statement) {
            return refused;
        }
        self.ensure_prepared(&statement);
        // Only the names may be here (a large Bind's parameters stream on behind them): the
        // length is the whole message's, adjusted for the new name.
        let rest = &body[pos..];
        let new_name = statement.name.as_bytes();
        let body_len = declared_body_len(msg) + new_name.len() - name.len();
        self.out.put_u8(b'B');
        self.out.put_u32((4 + body_len) as u32);
        for part in [portal.as_bytes(), b"\0", new_name, b"\0", rest] {
            self.out.put_slice(part);
        }
        let expect = Expect::Bind {
            swallow: false,
            statement: statement.id,
            client: Some(client),
        };
        self.push(expect, ClientAction::Replace)
    }

    /// Describe or Close: a kind byte ('S'tatement or 'P'ortal) and a name.
    pub(super) fn describe_or_close(&mut self, body: &[u8], describe: bool) -> ClientAction {
        let mut pos = 1;
        let kind = body.first().copied();
        let name = cstr(body, &mut pos).unwrap_or_default();
        let tracked = if kind == Some(b'S') && !name.is_empty() {
            let entry = self.client.names.get_key_value(name);
            entry.map(|(client, statement)| (client.clone(), statement.clone()))
        } else {
            None
        };
        match (tracked, describe) {
            (None, true) => {
                let expect = Expect::Describe {
                    statement: 0,
                    client: None,
                };
                self.push(expect, ClientAction::Forward)
            }
            (None, false) => {
                let undo = Undo::Nothing;
                self.push(
                    Expect::Close {
                        swallow: false,
                        undo,
                    },
                    ClientAction::Forward,
                )
            }
            (Some((client, statement)), true) => {
                if let Some(refused) = self.refuse_superseded(&statement) {
                    return refused;
                }
                self.ensure_prepared(&statement);
                put_message(self.out, b'D', &[b"S", statement.name.as_bytes(), b"\0"]);
                let expect = Expect::Describe {
                    statement: statement.id,
                    client: Some(client),
                };
                self.push(expect, ClientAction::Replace)
            }
            (Some((client, statement)), false) => {
                // The server keeps it for others; only this client's name goes.
                self.client.names.remove(name);
                let undo = Undo::Remap(client, statement);
                let response = Synthetic::CloseComplete;
                self.push(Expect::Synthetic { response, undo }, ClientAction::Replace)
            }
        }
    }

    /// A statement whose plan went stale after a schema change may return rows of another shape
    /// now; a client that prepared it before must be told, as PostgreSQL tells it on its own
    /// connection, so it prepares again. On a server that still has the stale statement the
    /// server says so itself; elsewhere the proxy has it say so.
    fn refuse_superseded(&mut self, s: &Arc<Statement>) -> Option<ClientAction> {
        if !s.superseded.load(Ordering::Relaxed) || self.server.contains(s.id) {
            return None;
        }
        Some(self.raise(
            STALE_CODE,
            STALE_MESSAGE,
            "plancache.c",
            "RevalidateCachedQuery",
        ))
    }

    /// Prepares `s` on this server first (into `out`) if it lacks it.
    fn ensure_prepared(&mut self, s: &Arc<Statement>) {
        if self.server.has(s.id) {
            self.registry.counters.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.prepare_on_server(s, true);
        }
    }

    /// A simple Query: SQL `DEALLOCATE name` of a tracked name is answered by the proxy (the
    /// server knows the statement by another name, and keeps it for other clients).
    pub(super) fn query(&mut self, body: &[u8], status: u8, changes_names: bool) -> ClientAction {
        if status != b'E'
            && let Some(name) = deallocate_target(body)
            && let Some((name, statement)) = self.client.names.remove_entry(name.as_str())
        {
            // Answered here, in its turn; nothing can make it fail now (see `must_wait`).
            let undo = Undo::Remap(name, statement);
            let response = Synthetic::Deallocated;
            self.queue.push_back(Expect::Synthetic { response, undo });
            return ClientAction::Replace;
        }
        self.push_query(changes_names)
    }
}

/// Writes `error` (an ErrorResponse) to `out` with every `"from"` in its fields replaced by
/// `"to"`; false (nothing written) when it does not mention `from`.
pub(super) fn rename_in_error(error: &[u8], from: &str, to: &str, out: &mut BytesMut) -> bool {
    let quoted = format!("\"{from}\"");
    let body = error.get(HEADER_LEN..).unwrap_or_default();
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    if !text.contains(&quoted) {
        return false;
    }
    let renamed = text.replace(&quoted, &format!("\"{to}\""));
    put_message(out, b'E', &[renamed.as_bytes()]);
    true
}

/// configuration_limit_exceeded: a limit of the proxy's configuration was reached.
const CONFIGURATION_LIMIT: &str = "53400";

/// What PostgreSQL says when a prepared statement's result shape changed under it.
pub(super) const STALE_CODE: &str = "0A000";
pub(super) const STALE_MESSAGE: &str = "cached plan must not change result type";

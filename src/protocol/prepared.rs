//! Named prepared statements that keep working in transaction mode: what exists where.
//!
//! Each distinct (query text, parameter types) gets one proxy-wide name (`__fg_<tag>_N`, the
//! [`Registry`]; the tag is random per process, so a client cannot guess a name and replace the
//! statement behind it). A client's statement names map to those ([`ClientStatements`]); each server
//! connection remembers which it has prepared ([`ServerStatements`], an LRU bounded by
//! `max_prepared_statements`). The [`super::pipeline`] tracker keeps them right as messages flow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{HEADER_LEN, cstr};

/// Prefix of the proxy's statement names; clients are unlikely to use it.
const NAME_PREFIX: &str = "__fg_";

/// A statement as servers know it.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The proxy-wide name (`__fg_<tag>_N`).
    pub name: String,
    /// A Parse message that prepares it under that name.
    pub parse: Bytes,
    /// Session state running it may leave (read once from its SQL).
    pub leftovers: super::sql::Leftovers,
    /// A server found its plan stale (the result shape changed): clients that prepare this
    /// text from now on get a new statement, and those that prepared it before are told, as
    /// PostgreSQL would tell them.
    pub superseded: std::sync::atomic::AtomicBool,
}

/// Counters for metrics and the admin console.
#[derive(Debug, Default)]
pub struct Counters {
    /// Parse messages sent to servers for named statements (prepared on a server).
    pub prepared: AtomicU64,
    /// Client Parse/Bind/Describe of a statement the server already had.
    pub hits: AtomicU64,
    /// Statements closed on a server to stay within `max_prepared_statements`.
    pub evictions: AtomicU64,
}

/// Every distinct statement any client has prepared, by (query, parameter types).
#[derive(Debug)]
pub struct Registry {
    statements: Mutex<Statements>,
    next_id: AtomicU64,
    /// Random per process, part of every name.
    tag: u32,
    /// Most bytes the statements may take (`max_prepared_statement_bytes`).
    budget: usize,
    pub counters: Counters,
}

/// The registry's map and what it costs.
#[derive(Debug, Default)]
struct Statements {
    map: HashMap<Box<[u8]>, Arc<Statement>>,
    /// Bytes held by the map's keys and statements, roughly.
    bytes: usize,
    /// Forget statements nobody uses once the map grows past this.
    collect_at: usize,
}

/// What an entry costs besides its text: the map slot, the Statement, its name.
const ENTRY_OVERHEAD: usize = 128;

impl Statements {
    fn cost(key: &[u8], s: &Statement) -> usize {
        key.len() + s.parse.len() + ENTRY_OVERHEAD
    }

    /// Forgets the statements only the registry holds (no client or server uses them).
    fn collect(&mut self) {
        let mut freed = 0;
        self.map.retain(|key, s| {
            let keep = Arc::strong_count(s) > 1;
            if !keep {
                freed += Self::cost(key, s);
            }
            keep
        });
        self.bytes -= freed;
        self.collect_at = 2 * self.map.len();
    }
}

impl Registry {
    /// A registry whose statements may take at most `budget` bytes.
    pub fn new(budget: usize) -> Registry {
        Registry {
            statements: Mutex::default(),
            next_id: AtomicU64::new(0),
            tag: rand::random(),
            budget,
            counters: Counters::default(),
        }
    }
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new(usize::MAX)
    }
}

impl Registry {
    /// A statement name of the proxy's own for `what` (never a registered statement's).
    pub(super) fn reserved_name(&self, what: &str) -> String {
        format!("{NAME_PREFIX}{:08x}_{what}", self.tag)
    }

    /// The proxy-wide name of statement `id`.
    pub(super) fn name_of(&self, id: u64) -> String {
        format!("{NAME_PREFIX}{:08x}_{id}", self.tag)
    }

    /// The statement for a Parse body's query-and-types part; `None` when a new one does not
    /// fit in the budget even after forgetting those nobody uses.
    pub(super) fn statement(&self, key: &[u8]) -> Option<Arc<Statement>> {
        let mut statements = self.statements.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = statements.map.get(key)
            && !s.superseded.load(Ordering::Relaxed)
        {
            return Some(s.clone());
        }
        let needed = key.len() * 2 + ENTRY_OVERHEAD;
        if statements.map.len() >= statements.collect_at.max(1024)
            || statements.bytes + needed > self.budget
        {
            statements.collect();
        }
        if statements.bytes + needed > self.budget {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = self.name_of(id);
        let mut parse = BytesMut::with_capacity(HEADER_LEN + name.len() + 1 + key.len());
        parse.put_u8(b'P');
        parse.put_u32((4 + name.len() + 1 + key.len()) as u32);
        parse.put_slice(name.as_bytes());
        parse.put_u8(0);
        parse.put_slice(key);
        let mut text_end = 0;
        let text = cstr(key, &mut text_end).map_or(&key[..0], str::as_bytes);
        let statement = Arc::new(Statement {
            id,
            name,
            parse: parse.freeze(),
            leftovers: super::sql::leftovers(text),
            superseded: Default::default(),
        });
        statements.bytes += Statements::cost(key, &statement);
        if let Some(old) = statements.map.insert(key.into(), statement.clone()) {
            statements.bytes -= Statements::cost(key, &old); // a superseded one
        }
        Some(statement)
    }
}

/// One client's statement names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    pub(super) names: HashMap<Arc<str>, Arc<Statement>>,
    /// Most names it may have (`max_client_prepared_statements`; 0 = no limit).
    pub max: usize,
}

impl ClientStatements {
    /// Names the client has now.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// No names yet; at most `max` (0: no limit).
    pub fn with_limit(max: usize) -> ClientStatements {
        ClientStatements {
            names: HashMap::new(),
            max,
        }
    }

    /// True when one more name would pass `max_client_prepared_statements`.
    pub(super) fn full(&self) -> bool {
        self.max > 0 && self.names.len() >= self.max
    }
}

impl ClientStatements {
    /// Answers a batch of named Parse messages closed by a Sync, sent while the client holds no
    /// server, without one: the names are recorded and each statement is prepared on whichever
    /// server first needs it. (A client that prepares synchronously while its other connections
    /// hold every server, as pgbench does, would otherwise wait for ever.) `buf` starts with the
    /// batch; returns the bytes it used and writes the answers to `out`, or `None` when `buf`
    /// does not start with such a complete batch (including a name already in use: the server
    /// must raise that error).
    pub fn prepare_without_server(
        &mut self,
        registry: &Registry,
        buf: &[u8],
        max_len: usize,
        out: &mut BytesMut,
    ) -> Option<usize> {
        let mut pos = 0;
        let mut names = Vec::new();
        loop {
            let (tag, len) = super::frame::header(&buf[pos..], max_len).ok()??;
            let body = buf.get(pos + HEADER_LEN..pos + HEADER_LEN + len)?;
            pos += HEADER_LEN + len;
            match tag {
                b'S' if !names.is_empty() => break,
                b'P' => {
                    let mut at = 0;
                    let name = cstr(body, &mut at).filter(|n| !n.is_empty())?;
                    if self.names.contains_key(name)
                        || names.iter().any(|(n, _)| n == name)
                        || (self.max > 0 && self.names.len() + names.len() >= self.max)
                    {
                        return None;
                    }
                    names.push((name.to_owned(), &body[at..]));
                }
                _ => return None,
            }
        }
        let mut statements = Vec::with_capacity(names.len());
        for (name, key) in names {
            // Over the registry's budget: the server path reports it.
            statements.push((name, registry.statement(key)?));
        }
        for (name, statement) in statements {
            self.names.insert(name.into(), statement);
            put_message(out, b'1', &[]);
        }
        put_message(out, b'Z', &[b"I"]);
        Some(pos)
    }
}

/// What one server connection has prepared, least recently used first out. A server's
/// record does not keep a statement alive in the [`Registry`]: once no client uses it, the
/// registry may forget it (the server keeps it under its name until evicted).
#[derive(Debug, Default)]
pub struct ServerStatements {
    entries: HashMap<u64, (Weak<Statement>, u64)>,
    clock: u64,
    /// Names of statements the server still has but refused to run (their plan went stale
    /// after a schema change): deallocated at the end of the transaction.
    stale: Vec<String>,
}

/// A statement a server had recorded: its id and (while the registry has it) the statement.
pub(super) type Recorded = (u64, Weak<Statement>);

impl ServerStatements {
    pub(super) fn has(&mut self, id: u64) -> bool {
        self.clock += 1;
        match self.entries.get_mut(&id) {
            Some(entry) => {
                entry.1 = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records `s`; returns the statement evicted to stay within `max`.
    pub(super) fn insert(&mut self, s: &Arc<Statement>, max: usize) -> Option<Recorded> {
        let evicted = if self.entries.len() >= max {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id);
            oldest.and_then(|id| Some((id, self.entries.remove(&id)?.0)))
        } else {
            None
        };
        self.record((s.id, Arc::downgrade(s)));
        evicted
    }

    /// Records a statement again (an eviction that did not happen).
    pub(super) fn record(&mut self, (id, statement): Recorded) {
        self.clock += 1;
        self.entries.insert(id, (statement, self.clock));
    }

    pub(super) fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    /// True if the server has statement `id` (without counting it as a use).
    pub(super) fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// The server refused to run statement `id` (called `name` there) because its plan is
    /// stale; returns the statement if the registry still has it.
    pub(super) fn mark_stale(&mut self, id: u64, name: String) -> Option<Arc<Statement>> {
        let (s, _) = self.entries.remove(&id)?;
        self.stale.push(name);
        s.upgrade()
    }

    /// Names of statements to close on the server (see [`Self::mark_stale`]); forgotten.
    pub fn take_all_stale(&mut self) -> Vec<String> {
        std::mem::take(&mut self.stale)
    }

    pub fn has_stale(&self) -> bool {
        !self.stale.is_empty()
    }

    /// The server dropped all its statements (DEALLOCATE ALL, DISCARD ALL, a reset).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.stale.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Appends a message of `tag` whose body is `parts` concatenated.
pub(super) fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u8(tag);
    out.put_u32((4 + len) as u32);
    for p in parts {
        out.put_slice(p);
    }
}

/// The name in a single `DEALLOCATE [PREPARE] name` statement (a Query body), unquoted and
/// case-folded as PostgreSQL would; `None` for anything else (including `DEALLOCATE ALL`).
pub(super) fn deallocate_target(body: &[u8]) -> Option<String> {
    // Nearly every query is something else: tell from the first word, before any UTF-8 check.
    let first = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if !body[first..]
        .get(..10)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"DEALLOCATE"))
    {
        return None;
    }
    let mut pos = 0;
    let sql = cstr(body, &mut pos)?
        .trim()
        .trim_end_matches(';')
        .trim_end();
    let rest = strip_keyword(sql, "DEALLOCATE")?;
    let rest = strip_keyword(rest, "PREPARE").unwrap_or(rest);
    let name = if let Some(quoted) = rest.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        if inner.contains('"') && !inner.contains("\"\"") {
            return None;
        }
        inner.replace("\"\"", "\"")
    } else {
        if rest.is_empty()
            || !rest
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            return None;
        }
        if rest.eq_ignore_ascii_case("ALL") {
            return None;
        }
        rest.to_lowercase()
    };
    Some(name)
}

/// `text` after a leading case-insensitive keyword and the whitespace after it.
fn strip_keyword<'t>(text: &'t str, keyword: &str) -> Option<&'t str> {
    let head = text.get(..keyword.len())?;
    let rest = &text[keyword.len()..];
    (head.eq_ignore_ascii_case(keyword) && rest.starts_with(char::is_whitespace))
        .then(|| rest.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_names() {
        let q = |s: &str| deallocate_target(format!("{s}\0").as_bytes());
        assert_eq!(q("DEALLOCATE s1"), Some("s1".into()));
        assert_eq!(q("  deallocate prepare S1 ; "), Some("s1".into()));
        assert_eq!(q("DEALLOCATE \"MiXed\""), Some("MiXed".into()));
        assert_eq!(q("DEALLOCATE ALL"), None);
        assert_eq!(q("DEALLOCATE s1; SELECT 1"), None);
        assert_eq!(q("SELECT 1"), None);
        assert_eq!(q("DEALLOCATEs1"), None);
    }

    #[test]
    fn the_registry_keeps_to_its_budget() {
        let reg = Registry::new(4 * 1024);
        let text = |i: usize| format!("SELECT {i} -- {}\0\0\0", "x".repeat(400)).into_bytes();
        let held: Vec<_> = (0..4).map(|i| reg.statement(&text(i)).unwrap()).collect();
        assert!(
            reg.statement(&text(99)).is_none(),
            "full while all are in use"
        );
        drop(held);
        assert!(
            reg.statement(&text(99)).is_some(),
            "unused ones are forgotten for room"
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let reg = Registry::default();
        let statement = |key: &[u8]| reg.statement(key).expect("no budget");
        let (a, b, c) = (
            statement(b"a\0\0\0"),
            statement(b"b\0\0\0"),
            statement(b"c\0\0\0"),
        );
        assert!(
            Arc::ptr_eq(&a, &statement(b"a\0\0\0")),
            "same text, same statement"
        );
        let mut server = ServerStatements::default();
        assert!(server.insert(&a, 2).is_none());
        assert!(server.insert(&b, 2).is_none());
        assert!(server.has(a.id));
        let evicted = server.insert(&c, 2).expect("full");
        assert_eq!(evicted.0, b.id);
        assert!(server.has(a.id) && server.has(c.id) && !server.has(b.id));
    }
}

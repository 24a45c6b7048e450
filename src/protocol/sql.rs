//! What a client's SQL may leave behind on a server session after its transaction ends.
//!
//! In transaction mode the next transaction on a server may belong to another client, so any
//! session state a client creates (a session-level `SET`, `SET ROLE`, `LISTEN`, an SQL
//! `PREPARE`, a `WITH HOLD` cursor, a temporary table, an advisory lock) must be cleaned up before
//! the server changes hands. This module reads SQL text the way PostgreSQL's lexer does —
//! skipping string literals, quoted identifiers, comments and dollar-quoted bodies — and looks at
//! the first words of each statement and a few words anywhere in it. It errs on the side of
//! "something was left": a false alarm costs one cleanup round trip, a miss leaks state.
//! `SET LOCAL` and ordinary statements leave nothing, so the common path costs no round trip.

/// Kinds of session state a statement may leave, as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leftovers(u8);

impl Leftovers {
    pub const NONE: Leftovers = Leftovers(0);
    /// A session-level setting changed (`SET`, `RESET`, `set_config`, `DISCARD`, `DO`).
    pub const SETTINGS: Leftovers = Leftovers(1);
    /// `SET ROLE` / `SET SESSION AUTHORIZATION` (not undone by `RESET ALL`).
    pub const ROLE: Leftovers = Leftovers(1 << 1);
    /// `LISTEN`.
    pub const LISTEN: Leftovers = Leftovers(1 << 2);
    /// SQL `PREPARE` / `DEALLOCATE`: the server's prepared statements are not what the proxy
    /// recorded any more.
    pub const PREPARED: Leftovers = Leftovers(1 << 3);
    /// A cursor declared `WITH HOLD`.
    pub const CURSORS: Leftovers = Leftovers(1 << 4);
    /// Temporary tables, views, sequences or functions.
    pub const TEMP: Leftovers = Leftovers(1 << 5);
    /// Session-level advisory locks taken by a direct call.
    pub const LOCKS: Leftovers = Leftovers(1 << 6);
    /// Every kind (what `server_reset_query_always` and unreadable SQL assume).
    pub const ALL: Leftovers = Leftovers(0x7f);
    /// Not a leftover: the SQL drops prepared statements (`DEALLOCATE`, `DISCARD`), which
    /// changes the names a client has once it runs.
    pub const NAMES: Leftovers = Leftovers(1 << 7);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Leftovers) -> bool {
        self.0 & other.0 == other.0
    }

    /// The kinds a server must be cleaned of ([`Self::NAMES`] left out).
    pub fn on_session(self) -> Leftovers {
        Leftovers(self.0 & Self::ALL.0)
    }
}

impl std::ops::BitOr for Leftovers {
    type Output = Leftovers;
    fn bitor(self, rhs: Leftovers) -> Leftovers {
        Leftovers(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Leftovers {
    fn bitor_assign(&mut self, rhs: Leftovers) {
        self.0 |= rhs.0;
    }
}

/// What `sql` (one or more statements) may leave on the session.
pub fn leftovers(sql: &[u8]) -> Leftovers {
    let mut found = Leftovers::NONE;
    let mut statement = Statement::default();
    let mut lexer = Lexer { sql, pos: 0 };
    while let Some(token) = lexer.next() {
        match token {
            Token::Semicolon => found |= std::mem::take(&mut statement).leftovers(),
            Token::Word(word) => statement.word(word),
        }
    }
    found | statement.leftovers()
}

/// What a `CommandComplete` tag says a statement did, for SQL the proxy could not read (a
/// statement prepared before tracking, a query too long to hold). Cruder than [`leftovers`]:
/// `SET LOCAL` and `SET` have the same tag.
pub fn leftovers_of_tag(tag: &[u8]) -> Leftovers {
    let starts = |prefix: &[u8]| tag.starts_with(prefix);
    if starts(b"SET\0") || starts(b"RESET\0") || starts(b"DISCARD") {
        Leftovers::SETTINGS | Leftovers::ROLE
    } else if starts(b"LISTEN\0") {
        Leftovers::LISTEN
    } else if starts(b"PREPARE\0") || starts(b"DEALLOCATE") {
        Leftovers::PREPARED
    } else if starts(b"DECLARE CURSOR\0") {
        Leftovers::CURSORS
    } else if starts(b"CREATE ") || starts(b"SELECT ") {
        // `CREATE TEMP TABLE`, `CREATE TEMP TABLE AS` and `SELECT INTO TEMP` cannot be told
        // from their permanent forms by the tag.
        Leftovers::TEMP
    } else {
        Leftovers::NONE
    }
}

/// The first words of one statement and the telling words anywhere in it.
#[derive(Debug, Default)]
struct Statement {
    /// Up to three leading words, upper-cased (longer words are cut; none we look for are).
    first: [[u8; 16]; 3],
    words: usize,
    anywhere: Leftovers,
}

impl Statement {
    fn word(&mut self, word: &[u8]) {
        if self.words < self.first.len() {
            let slot = &mut self.first[self.words];
            for (to, from) in slot.iter_mut().zip(word) {
                *to = from.to_ascii_uppercase();
            }
        }
        self.words += 1;
        self.anywhere |= anywhere(word);
    }

    fn is(&self, i: usize, keyword: &str) -> bool {
        let slot = &self.first[i];
        let k = keyword.as_bytes();
        i < self.words && slot.starts_with(k) && slot.get(k.len()).is_none_or(|&b| b == 0)
    }

    fn leftovers(self) -> Leftovers {
        let leading = if self.is(0, "SET") {
            if self.is(1, "LOCAL") || self.is(1, "TRANSACTION") || self.is(1, "CONSTRAINTS") {
                Leftovers::NONE
            } else if self.is(1, "ROLE")
                || (self.is(1, "SESSION") && (self.is(2, "AUTHORIZATION") || self.is(2, "ROLE")))
            {
                Leftovers::ROLE
            } else {
                Leftovers::SETTINGS
            }
        } else if self.is(0, "RESET") {
            if self.is(1, "ROLE") || self.is(1, "SESSION") {
                Leftovers::ROLE
            } else {
                Leftovers::SETTINGS
            }
        } else if self.is(0, "LISTEN") {
            Leftovers::LISTEN
        } else if self.is(0, "PREPARE") {
            // `PREPARE TRANSACTION` (two-phase commit) detaches the transaction: nothing stays.
            match self.is(1, "TRANSACTION") {
                true => Leftovers::NONE,
                false => Leftovers::PREPARED,
            }
        } else if self.is(0, "DEALLOCATE") {
            // `DEALLOCATE ALL` is seen in its CommandComplete and forgets everything there.
            match self.is(1, "ALL") || (self.is(1, "PREPARE") && self.is(2, "ALL")) {
                true => Leftovers::NAMES,
                false => Leftovers::PREPARED | Leftovers::NAMES,
            }
        } else if self.is(0, "DECLARE") {
            Leftovers::NONE // WITH HOLD is found by `anywhere`
        } else if self.is(0, "DISCARD") {
            // Changes settings the proxy tracks (DISCARD ALL resets them): read them back.
            Leftovers::SETTINGS | Leftovers::NAMES
        } else if self.is(0, "DO") {
            // An anonymous block may run anything; its body is not read.
            Leftovers::SETTINGS | Leftovers::ROLE | Leftovers::TEMP
        } else {
            Leftovers::NONE
        };
        let anywhere = match self.is(0, "DECLARE") {
            true => self.anywhere,
            false => Leftovers(self.anywhere.0 & !Leftovers::CURSORS.0),
        };
        leading | anywhere
    }
}

/// Words that leave state wherever they appear in a statement.
fn anywhere(word: &[u8]) -> Leftovers {
    const WORDS: [(&str, Leftovers); 8] = [
        ("temp", Leftovers::TEMP),
        ("temporary", Leftovers::TEMP),
        ("pg_temp", Leftovers::TEMP),
        ("hold", Leftovers::CURSORS),
        ("set_config", Leftovers::SETTINGS),
        ("pg_advisory_lock", Leftovers::LOCKS),
        ("pg_advisory_lock_shared", Leftovers::LOCKS),
        ("pg_try_advisory_lock", Leftovers::LOCKS),
    ];
    // Cheap rejection first: every word above starts with t, p, h or s.
    if !matches!(
        word.first().map(u8::to_ascii_lowercase),
        Some(b't' | b'p' | b'h' | b's')
    ) {
        return Leftovers::NONE;
    }
    let mut found = Leftovers::NONE;
    for (w, kind) in WORDS {
        if word.eq_ignore_ascii_case(w.as_bytes()) {
            found |= kind;
        }
    }
    if word.len() > 20 && word[..21].eq_ignore_ascii_case(b"pg_try_advisory_lock_") {
        found |= Leftovers::LOCKS; // pg_try_advisory_lock_shared
    }
    found
}

enum Token<'a> {
    Word(&'a [u8]),
    Semicolon,
}

/// Splits SQL into words and statement-ending semicolons, skipping literals and comments.
struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn next(&mut self) -> Option<Token<'a>> {
        let sql = self.sql;
        while let Some(&c) = sql.get(self.pos) {
            let class = CLASS[usize::from(c)];
            if class & WORD_START != 0 {
                // `E'...'`: the quote right after a lone E is an escape string, handled by the
                // quote arm on the next call.
                let start = self.pos;
                self.pos = skip_class(sql, self.pos + 1, WORD_CHAR);
                return Some(Token::Word(&sql[start..self.pos]));
            }
            if class & DIGIT != 0 {
                self.pos = skip_class(sql, self.pos + 1, WORD_CHAR | DOT);
                continue;
            }
            if class & SPECIAL == 0 {
                self.pos += 1; // blanks, operators, brackets
                continue;
            }
            let next = sql.get(self.pos + 1).copied();
            match c {
                b';' => {
                    self.pos += 1;
                    return Some(Token::Semicolon);
                }
                b'\'' => {
                    let escapes = self.pos > 0 && sql[self.pos - 1].eq_ignore_ascii_case(&b'e');
                    self.pos = skip_quoted(sql, self.pos + 1, b'\'', escapes);
                }
                b'"' => self.pos = skip_quoted(sql, self.pos + 1, b'"', false),
                b'-' if next == Some(b'-') => {
                    self.pos = memchr(b'\n', sql, self.pos).unwrap_or(sql.len());
                }
                b'/' if next == Some(b'*') => self.pos = skip_block_comment(sql, self.pos),
                b'$' => self.pos = skip_dollar_quoted(sql, self.pos),
                _ => self.pos += 1,
            }
        }
        None
    }
}

// Byte classes, looked up once per byte: the lexer's inner loops are the proxy's only per-byte
// work on SQL text, so they test one table entry instead of a chain of comparisons.
/// Starts an identifier or keyword: a letter, `_` or any non-ASCII byte.
const WORD_START: u8 = 1;
/// Continues one: a word start, a digit or `$`.
const WORD_CHAR: u8 = 1 << 1;
const DIGIT: u8 = 1 << 2;
const DOT: u8 = 1 << 3;
/// May start a token the lexer must read: `;`, a quote, a comment or a dollar quote.
const SPECIAL: u8 = 1 << 4;

static CLASS: [u8; 256] = classes();

const fn classes() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let start = c.is_ascii_alphabetic() || c == b'_' || c >= 0x80;
        let digit = c.is_ascii_digit();
        let mut class = 0;
        if start {
            class |= WORD_START;
        }
        if start || digit || c == b'$' {
            class |= WORD_CHAR;
        }
        if digit {
            class |= DIGIT;
        }
        if c == b'.' {
            class |= DOT;
        }
        if matches!(c, b';' | b'\'' | b'"' | b'-' | b'/' | b'$') {
            class |= SPECIAL;
        }
        table[i] = class;
        i += 1;
    }
    table
}

/// The first position at or after `from` whose byte is in none of `classes`.
fn skip_class(sql: &[u8], from: usize, classes: u8) -> usize {
    sql[from..]
        .iter()
        .position(|&b| CLASS[usize::from(b)] & classes == 0)
        .map_or(sql.len(), |i| from + i)
}

fn is_word_char(c: u8) -> bool {
    CLASS[usize::from(c)] & WORD_CHAR != 0
}

fn memchr(needle: u8, hay: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .iter()
        .position(|&b| b == needle)
        .map(|i| from + i)
}

/// Past the closing `quote` of a literal or identifier that starts at `pos` (a doubled quote is
/// part of it; with `escapes`, so is a backslash-escaped one).
fn skip_quoted(sql: &[u8], mut pos: usize, quote: u8, escapes: bool) -> usize {
    while let Some(&c) = sql.get(pos) {
        if escapes && c == b'\\' {
            pos += 2;
        } else if c == quote {
            if sql.get(pos + 1) == Some(&quote) {
                pos += 2;
            } else {
                return pos + 1;
            }
        } else {
            pos += 1;
        }
    }
    sql.len()
}

/// Past a `/* ... */` comment starting at `pos`; they nest in PostgreSQL.
fn skip_block_comment(sql: &[u8], mut pos: usize) -> usize {
    let mut depth = 0;
    while pos < sql.len() {
        if sql[pos..].starts_with(b"/*") {
            depth += 1;
            pos += 2;
        } else if sql[pos..].starts_with(b"*/") {
            depth -= 1;
            pos += 2;
            if depth == 0 {
                return pos;
            }
        } else {
            pos += 1;
        }
    }
    sql.len()
}

/// Past a `$tag$ ... $tag$` body starting at `pos`; a `$` that does not open one (a parameter
/// such as `$1`) is stepped over.
fn skip_dollar_quoted(sql: &[u8], pos: usize) -> usize {
    let mut end = pos + 1;
    while sql
        .get(end)
        .is_some_and(|&b| is_word_char(b) && b != b'$' && !(end == pos + 1 && b.is_ascii_digit()))
    {
        end += 1;
    }
    if sql.get(end) != Some(&b'$') {
        return pos + 1;
    }
    let tag = &sql[pos..=end];
    let body = end + 1;
    match sql[body..].windows(tag.len()).position(|w| w == tag) {
        Some(i) => body + i + tag.len(),
        None => sql.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(sql: &str) -> Leftovers {
        leftovers(sql.as_bytes())
    }

    #[test]
    fn ordinary_statements_and_set_local_leave_nothing() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "BEGIN; SET LOCAL search_path = a; SELECT 1; COMMIT",
            "set local statement_timeout = '1s'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SELECT 'SET ROLE x; LISTEN y'",
            "SELECT \"temp\" FROM t",
            "SELECT 1 -- SET search_path = x\n",
            "/* LISTEN /* nested */ x */ SELECT 1",
            "SELECT $body$ DISCARD TEMP $body$, $1",
            "SELECT E'it\\'s; SET x = 1'",
            "PREPARE TRANSACTION 'gx'",
            "DECLARE c CURSOR FOR SELECT 1",
            "SELECT pg_advisory_xact_lock(1)",
            "UPDATE t SET a = 1",
            "",
        ] {
            assert_eq!(of(sql), Leftovers::NONE, "{sql}");
        }
    }

    #[test]
    fn session_state_is_found() {
        let cases = [
            ("SET search_path = tenant_1", Leftovers::SETTINGS),
            ("set session statement_timeout to 5", Leftovers::SETTINGS),
            ("SELECT 1; SET TimeZone = 'UTC'", Leftovers::SETTINGS),
            ("RESET ALL", Leftovers::SETTINGS),
            (
                "SELECT pg_catalog.set_config('a.b', 'c', false)",
                Leftovers::SETTINGS,
            ),
            ("SET ROLE other", Leftovers::ROLE),
            ("SET SESSION AUTHORIZATION other", Leftovers::ROLE),
            ("SET SESSION ROLE other", Leftovers::ROLE),
            ("RESET ROLE", Leftovers::ROLE),
            ("LISTEN channel", Leftovers::LISTEN),
            ("PREPARE q(int) AS SELECT $1", Leftovers::PREPARED),
            ("DEALLOCATE __fg_1", Leftovers::PREPARED),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Leftovers::CURSORS,
            ),
            ("CREATE TEMP TABLE x (a int)", Leftovers::TEMP),
            (
                "create local temporary table x as select 1",
                Leftovers::TEMP,
            ),
            ("SELECT * INTO TEMP x FROM t", Leftovers::TEMP),
            (
                "CREATE FUNCTION pg_temp.f() RETURNS int AS 'SELECT 1' LANGUAGE sql",
                Leftovers::TEMP,
            ),
            ("SELECT pg_advisory_lock(1)", Leftovers::LOCKS),
            ("SELECT pg_try_advisory_lock_shared(1)", Leftovers::LOCKS),
            ("DISCARD ALL", Leftovers::SETTINGS | Leftovers::NAMES),
            ("DEALLOCATE ALL", Leftovers::NAMES),
            (
                "deallocate prepare s1",
                Leftovers::PREPARED | Leftovers::NAMES,
            ),
        ];
        for (sql, expected) in cases {
            assert!(of(sql).contains(expected), "{sql}: {:?}", of(sql));
        }
        assert!(of("DO $$BEGIN EXECUTE 'SET ROLE x'; END$$").contains(Leftovers::ROLE));
    }

    #[test]
    fn tags_are_a_cruder_fallback() {
        assert!(leftovers_of_tag(b"SET\0").contains(Leftovers::SETTINGS));
        assert_eq!(leftovers_of_tag(b"LISTEN\0"), Leftovers::LISTEN);
        assert_eq!(leftovers_of_tag(b"DEALLOCATE ALL\0"), Leftovers::PREPARED);
        assert_eq!(leftovers_of_tag(b"CREATE TABLE\0"), Leftovers::TEMP);
        assert_eq!(leftovers_of_tag(b"UPDATE 1\0"), Leftovers::NONE);
        assert_eq!(leftovers_of_tag(b"COMMIT\0"), Leftovers::NONE);
    }
}

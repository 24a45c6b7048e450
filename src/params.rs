//! Session parameters the proxy keeps per client and per server, so that one client's
//! `SET TimeZone` or startup `search_path` is never seen by another: when a server is attached
//! whose values differ from the client's, the proxy sets (or resets) them first.
//!
//! A client's value `None` means "the server's default" (what a fresh login gives). A server's
//! record is exact: parameters PostgreSQL reports (ParameterStatus) are updated from every report;
//! the others (`search_path` before PostgreSQL 18, `track_extra_parameters`) are recorded from
//! every `SET`/`RESET` the proxy sends, and put back to `None` by every cleanup that runs
//! `RESET ALL`.

use std::sync::Arc;

/// The parameters carried between servers by default: those PostgreSQL reports, and
/// `search_path` (reported by PostgreSQL 18 and later only; tracked either way).
pub const TRACKED: [&str; 7] = [
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
    "search_path",
];

/// At most this many parameters are tracked (a bit each in [`Params`]).
pub const MAX_TRACKED: usize = 64;

/// The names of the tracked parameters: [`TRACKED`] plus `track_extra_parameters`.
pub type Names = Arc<[String]>;

/// [`TRACKED`] followed by `extra` (without repeats, compared case-insensitively).
pub fn names(extra: &[String]) -> Names {
    let mut names: Vec<String> = TRACKED.iter().map(|s| s.to_string()).collect();
    for name in extra {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.clone());
        }
    }
    names.into()
}

/// True for a name that can be written unquoted in `SET name = ...`: an identifier, or two
/// joined by a dot (a custom parameter such as `app.tenant`).
pub fn is_valid_name(name: &str) -> bool {
    let part = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match name.split_once('.') {
        Some((a, b)) => part(a) && part(b),
        None => part(name),
    }
}

/// Values of the tracked parameters, in [`Names`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    names: Names,
    values: Vec<Option<String>>,
    /// Bit `i`: the server reports parameter `i`, so its value is known from ParameterStatus.
    reported: u64,
}

impl Params {
    /// No values: every parameter at the server's default.
    pub fn new(names: Names) -> Params {
        let values = vec![None; names.len()];
        Params {
            names,
            values,
            reported: 0,
        }
    }

    /// The tracked name matching `name` (any case), in the tracked spelling.
    pub fn tracked<'a>(names: &'a Names, name: &str) -> Option<&'a str> {
        names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }

    fn slot(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|t| t.eq_ignore_ascii_case(name))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values[self.slot(name)?].as_deref()
    }

    /// Records a value; names that are not tracked are ignored. Reuses the string's allocation.
    pub fn set(&mut self, name: &str, value: &str) {
        if let Some(i) = self.slot(name) {
            match &mut self.values[i] {
                Some(v) if v == value => {}
                Some(v) => {
                    v.clear();
                    v.push_str(value);
                }
                slot => *slot = Some(value.to_owned()),
            }
        }
    }

    /// Records a value the server reported (ParameterStatus): from now on this parameter is
    /// known from the server's reports.
    pub fn set_reported(&mut self, name: &str, value: &str) {
        if let Some(i) = self.slot(name) {
            self.reported |= 1 << i;
            self.set(name, value);
        }
    }

    /// True when [`Self::set_statements`] would have something to say.
    pub fn differs(&self, wanted: &Params) -> bool {
        wanted.values.iter().enumerate().any(|(i, want)| {
            let reported = self.reported & (1 << i) != 0;
            self.values[i] != *want && !(reported && want.is_none())
        })
    }

    /// SQL that makes a server with these values take `wanted`'s (`SET` for a value, `RESET`
    /// for the default); empty when they agree. A reported parameter the client has no value
    /// for is left as it is (clients get every reported value at login).
    pub fn set_statements(&self, wanted: &Params) -> String {
        let mut sql = String::new();
        for (i, want) in wanted.values.iter().enumerate() {
            let reported = self.reported & (1 << i) != 0;
            if self.values[i] == *want || (reported && want.is_none()) {
                continue;
            }
            let name = &self.names[i];
            match want {
                Some(want) => sql.push_str(&format!("SET {name} = {};", quote(want))),
                None => sql.push_str(&format!("RESET {name};")),
            }
        }
        sql
    }

    /// After [`Self::set_statements`] ran on this server: the parameters it does not report now
    /// have `wanted`'s values (the reported ones were updated by the server's reports).
    pub fn applied(&mut self, wanted: &Params) {
        for i in 0..self.values.len() {
            if self.reported & (1 << i) == 0 && self.values[i] != wanted.values[i] {
                self.values[i] = wanted.values[i].clone();
            }
        }
    }

    /// After `RESET ALL` or `DISCARD ALL` on this server: parameters it does not report are back
    /// at their defaults (the reported ones come back in ParameterStatus messages).
    pub fn reset_unreported(&mut self) {
        for i in 0..self.values.len() {
            if self.reported & (1 << i) == 0 {
                self.values[i] = None;
            }
        }
    }

    /// Names of the parameters `server` does not report: their values are only known by asking.
    pub fn unreported<'a>(&'a self, server: &'a Params) -> impl Iterator<Item = &'a str> + 'a {
        self.names
            .iter()
            .enumerate()
            .filter(|(i, _)| server.reported & (1 << i) == 0)
            .map(|(_, n)| n.as_str())
    }

    /// Sets `name` to `value` (`None`: the server's default).
    pub fn put(&mut self, name: &str, value: Option<String>) {
        if let Some(i) = self.slot(name) {
            self.values[i] = value;
        }
    }

    /// Takes `server`'s spelling of every value this set has that the server reports.
    pub fn adopt(&mut self, server: &Params) {
        for (i, (mine, theirs)) in self.values.iter_mut().zip(&server.values).enumerate() {
            if server.reported & (1 << i) != 0
                && mine.is_some()
                && let Some(v) = theirs
                && mine.as_ref() != Some(v)
            {
                *mine = Some(v.clone());
            }
        }
    }

    /// (name, value) pairs that are set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.names
            .iter()
            .zip(&self.values)
            .filter_map(|(n, v)| Some((n.as_str(), v.as_deref()?)))
    }
}

/// An escape-string literal, correct whatever `standard_conforming_strings` is.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    out.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Parameters in libpq's `options` startup parameter: `-c name=value` and `--name=value`
/// switches, separated by spaces, a backslash escaping the next character. `Err` names the
/// first part that is not such a switch.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut params = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words
                .next()
                .ok_or_else(|| "-c without name=value".to_string())?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(word);
        };
        let (name, value) = setting.split_once('=').ok_or_else(|| setting.clone())?;
        // PostgreSQL reads `--some-name` as `some_name`.
        params.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(params)
}

/// SQLSTATE and message of a server ErrorResponse.
pub fn error_fields(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> (String, String) {
    use fallible_iterator::FallibleIterator;
    let (mut code, mut message) = (String::from("XX000"), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' if is_sqlstate(&value) => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    // A hostile or broken upstream must not hand a client a huge message.
    if message.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    (code, message)
}

/// Longest server error message passed on (from the proxy's own login and queries).
const MAX_ERROR_MESSAGE: usize = 2048;

/// Five ASCII digits or upper-case letters, as every SQLSTATE is.
fn is_sqlstate(code: &str) -> bool {
    code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_error_fields_are_tamed() {
        assert!(is_sqlstate("57P03") && is_sqlstate("XX000"));
        assert!(!is_sqlstate("") && !is_sqlstate("hello") && !is_sqlstate("57P031"));
        let mut body = bytes::BytesMut::new();
        body.extend_from_slice(b"SFATAL\0Cnot a code\0M");
        body.extend_from_slice("é".repeat(3000).as_bytes());
        body.extend_from_slice(b"\0\0");
        let mut msg = bytes::BytesMut::new();
        msg.extend_from_slice(b"E");
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(&body);
        let Ok(Some(postgres_protocol::message::backend::Message::ErrorResponse(e))) =
            postgres_protocol::message::backend::Message::parse(&mut msg)
        else {
            panic!("an ErrorResponse")
        };
        let (code, message) = error_fields(&e);
        assert_eq!(code, "XX000");
        assert!(message.len() <= MAX_ERROR_MESSAGE + 3 && message.ends_with("..."));
    }

    #[test]
    fn only_differences_are_set_and_quoted() {
        let names = names(&["app.tenant".into()]);
        let mut server = Params::new(names.clone());
        server.set_reported("TimeZone", "UTC");
        server.set_reported("application_name", "");
        server.set("not_tracked", "x");
        assert_eq!(server.get("not_tracked"), None);
        let mut client = server.clone();
        assert_eq!(server.set_statements(&client), "");
        client.set("timezone", "Asia/Tokyo");
        client.set("application_name", "it's\\");
        client.set("APP.TENANT", "7");
        assert_eq!(
            server.set_statements(&client),
            "SET TimeZone = E'Asia/Tokyo';SET application_name = E'it''s\\\\';\
             SET app.tenant = E'7';"
        );
    }

    #[test]
    fn unreported_values_follow_what_was_sent_and_reset() {
        let names = names(&[]);
        let mut server = Params::new(names.clone());
        server.set_reported("TimeZone", "UTC");
        let mut tenant_a = Params::new(names.clone());
        tenant_a.set("search_path", "a");
        assert_eq!(server.set_statements(&tenant_a), "SET search_path = E'a';");
        server.applied(&tenant_a);
        let mut tenant_b = Params::new(names.clone());
        tenant_b.set("search_path", "b");
        assert_eq!(server.set_statements(&tenant_b), "SET search_path = E'b';");
        server.applied(&tenant_b);
        let nobody = Params::new(names.clone());
        assert_eq!(server.set_statements(&nobody), "RESET search_path;");
        server.applied(&nobody);
        assert_eq!(server.set_statements(&nobody), "");
        server.set("search_path", "x");
        server.reset_unreported();
        assert_eq!(server.get("search_path"), None);
        assert_eq!(server.get("TimeZone"), Some("UTC"), "reported values stay");
        assert_eq!(
            nobody.unreported(&server).collect::<Vec<_>>(),
            [
                "client_encoding",
                "DateStyle",
                "IntervalStyle",
                "standard_conforming_strings",
                "application_name",
                "search_path"
            ]
        );
    }

    #[test]
    fn libpq_options() {
        assert_eq!(
            parse_options("-c search_path=a,b  --statement-timeout=5s -cgeqo=off").unwrap(),
            [
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("geqo".into(), "off".into())
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=my\ app").unwrap(),
            [("application_name".into(), "my app".into())]
        );
        assert_eq!(parse_options("-B 100"), Err("-B".into()));
        assert_eq!(parse_options("-c nameonly"), Err("nameonly".into()));
        assert!(parse_options("").unwrap().is_empty());
        assert!(is_valid_name("app.tenant") && is_valid_name("search_path"));
        assert!(!is_valid_name("a;b") && !is_valid_name("1a") && !is_valid_name("a.b.c"));
    }
}

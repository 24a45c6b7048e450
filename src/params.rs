//! Session parameters the proxy keeps per client and per server, so that one client's
//! `SET TimeZone` is never seen by another: when a server is attached whose values differ from
//! the client's, the proxy sets them first.

/// The parameters PostgreSQL reports (ParameterStatus) that the proxy carries between servers.
/// `search_path` is reported by newer servers only; it is tracked when it is.
pub const TRACKED: [&str; 7] = [
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
    "search_path",
];

/// The canonical spelling of a tracked parameter name (startup packets may use any case).
pub fn tracked(name: &str) -> Option<&'static str> {
    TRACKED
        .iter()
        .copied()
        .find(|t| t.eq_ignore_ascii_case(name))
}

/// Values of tracked parameters, in [`TRACKED`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    values: [Option<String>; TRACKED.len()],
}

impl Params {
    fn slot(name: &str) -> Option<usize> {
        TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values[Self::slot(name)?].as_deref()
    }

    /// Records a value; names that are not tracked are ignored. Reuses the string's allocation.
    pub fn set(&mut self, name: &str, value: &str) {
        if let Some(i) = Self::slot(name) {
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

    /// SQL that makes a server with these values take `wanted`'s; empty when they agree.
    pub fn set_statements(&self, wanted: &Params) -> String {
        let mut sql = String::new();
        for (i, want) in wanted.values.iter().enumerate() {
            if let Some(want) = want
                && self.values[i].as_deref() != Some(want.as_str())
            {
                sql.push_str(&format!("SET {} = {};", TRACKED[i], quote(want)));
            }
        }
        sql
    }

    /// Takes `server`'s spelling of every value this set has.
    pub fn adopt(&mut self, server: &Params) {
        for (mine, theirs) in self.values.iter_mut().zip(&server.values) {
            if mine.is_some()
                && let Some(v) = theirs
            {
                *mine = Some(v.clone());
            }
        }
    }

    /// (name, value) pairs that are set.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        TRACKED
            .iter()
            .zip(&self.values)
            .filter_map(|(n, v)| Some((*n, v.as_deref()?)))
    }
}

/// An escape-string literal, correct whatever `standard_conforming_strings` is.
fn quote(value: &str) -> String {
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
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differences_are_set_and_quoted() {
        let mut server = Params::default();
        server.set("TimeZone", "UTC");
        server.set("application_name", "");
        server.set("not_tracked", "x");
        assert_eq!(server.get("not_tracked"), None);
        let mut client = server.clone();
        assert_eq!(server.set_statements(&client), "");
        client.set("timezone", "Asia/Tokyo");
        client.set("application_name", "it's\\");
        assert_eq!(
            server.set_statements(&client),
            "SET TimeZone = E'Asia/Tokyo';SET application_name = E'it''s\\\\';"
        );
        assert_eq!(tracked("datestyle"), Some("DateStyle"));
    }
}

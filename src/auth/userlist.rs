//! `auth_file`: users in PgBouncer's userlist.txt format, one per line: `"name" "password"`
//! (plain text, `md5…` or `SCRAM-SHA-256$…`), `""` for a literal quote, `;` or `#` starting a
//! comment line.

/// The users of a userlist.txt, or the first bad line (1-based) and why.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut users = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why} (expected \"name\" \"password\")", i + 1);
        let mut rest = line;
        let name = quoted(&mut rest).ok_or_else(|| bad("the user name is not quoted"))?;
        let password = quoted(&mut rest).ok_or_else(|| bad("the password is not quoted"))?;
        if name.is_empty() {
            return Err(bad("empty user name"));
        }
        users.push((name, password));
    }
    Ok(users)
}

/// The next `"..."` of `rest` (after blanks), with `""` read as one quote.
fn quoted(rest: &mut &str) -> Option<String> {
    let s = rest.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if let Some((_, '"')) = chars.peek() {
                chars.next();
                out.push('"');
                continue;
            }
            *rest = &s[i + 1..];
            return Some(out);
        }
        out.push(c);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_pgbouncer_userlists() {
        let users =
            parse("; comment\n\"app\" \"secret\"\n\n\"we\"\"ird\" \"md5abc\" extra\n# more\n")
                .unwrap();
        assert_eq!(
            users,
            [
                ("app".to_string(), "secret".to_string()),
                ("we\"ird".to_string(), "md5abc".to_string())
            ]
        );
        assert!(parse("app secret\n").unwrap_err().contains("line 1"));
        assert!(
            parse("\"app\" \"unterminated\n")
                .unwrap_err()
                .contains("line 1")
        );
    }
}

//! MD5 password authentication (`AuthenticationMD5Password`), server side.

use md5::{Digest, Md5};

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored form PostgreSQL uses: `md5` + hex(md5(password + user)).
pub fn hash(password: &str, user: &str) -> String {
    format!("md5{}", hex_md5(&[password.as_bytes(), user.as_bytes()]))
}

/// True for a stored md5 hash rather than a plain-text password.
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a client that knows the password answers to `salt`, given the stored hash.
pub fn expected_response(stored: &str, salt: [u8; 4]) -> String {
    format!(
        "md5{}",
        hex_md5(&[stored.as_bytes().get(3..).unwrap_or_default(), &salt])
    )
}

/// Compares without an early exit, so timing does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libpq() {
        let stored = hash("secret", "app");
        assert!(is_md5_hash(&stored));
        let salt = [1, 2, 3, 4];
        let client = postgres_protocol::authentication::md5_hash(b"app", b"secret", salt);
        assert_eq!(expected_response(&stored, salt), client);
    }
}

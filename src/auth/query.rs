//! `auth_query`: the secrets of users not in `[[users]]` / `auth_file`, looked up in PostgreSQL
//! through a server of the `auth_user` pool (on `auth_dbname`, or the database the client asked
//! for), cached briefly. The lookup runs on Floodgate's own server session: no startup
//! parameter of the client is ever applied to it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Secrets;
use crate::shared::Shared;

/// How long a looked-up secret (or its absence) is reused.
const CACHE_FOR: Duration = Duration::from_secs(10);
/// Names cached at most.
const MAX_CACHED: usize = 10_000;
/// Longest a lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// PgBouncer's default, with VALID UNTIL honoured and every name schema-qualified (a client's
/// search_path left on a server cannot redirect it).
pub const DEFAULT_QUERY: &str = "SELECT usename, CASE WHEN valuntil IS NULL OR valuntil \
    OPERATOR(pg_catalog.>) pg_catalog.now() THEN passwd END FROM pg_catalog.pg_shadow \
    WHERE usename OPERATOR(pg_catalog.=) $1";

/// A lookup's answer, and when it was made.
type Cached = (Instant, Option<Secrets>);

/// Lookups by (database, user).
#[derive(Default)]
pub struct AuthQueryCache {
    by_user: Mutex<HashMap<(String, String), Cached>>,
}

/// `text` as a dollar-quoted literal whose tag does not occur in it.
fn literal(text: &str) -> String {
    let mut tag = String::from("fg");
    while text.contains(&format!("${tag}$")) {
        tag.push('x');
    }
    format!("${tag}${text}${tag}$")
}

/// The secrets of `user`, if `auth_user` is configured and PostgreSQL knows a valid password
/// for it (md5 or SCRAM secret). Failures are logged and count as unknown.
pub async fn lookup(shared: &Shared, database: &str, user: &str) -> Option<Secrets> {
    let config = shared.config();
    let g = &config.floodgate;
    let auth_user = g.auth_user.as_deref()?;
    let dbname = g.auth_dbname.as_deref().unwrap_or(database);
    let key = (dbname.to_owned(), user.to_owned());
    {
        let cache = shared
            .auth_cache
            .by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, secrets)) = cache.get(&key)
            && at.elapsed() < CACHE_FOR
        {
            return secrets.clone();
        }
    }
    let query = g
        .auth_query
        .as_deref()
        .unwrap_or(DEFAULT_QUERY)
        .replace("$1", &literal(user));
    let pool = shared.pool(dbname, auth_user)?;
    let run = async {
        let mut server = pool.checkout().await.map_err(|e| e.to_string())?;
        match server.query_rows(&query).await {
            Ok(rows) => {
                server.dirty = false;
                Ok(rows)
            }
            Err(e) => Err(format!("{e:?}")),
        }
    };
    let rows = match tokio::time::timeout(LOOKUP_TIMEOUT, run).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::warn!(%user, error = %e, "auth_query failed");
            return None;
        }
        Err(_) => {
            tracing::warn!(%user, "auth_query timed out");
            return None;
        }
    };
    let secret = rows
        .first()
        .and_then(|row| row.get(1).cloned().flatten())
        .filter(|p| super::md5::is_md5_hash(p) || p.starts_with("SCRAM-SHA-256$"));
    let secrets = secret.map(|p| Secrets::new(user, &p));
    let mut cache = shared
        .auth_cache
        .by_user
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if cache.len() >= MAX_CACHED {
        cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
    }
    cache.insert(key, (Instant::now(), secrets.clone()));
    secrets
}

#[cfg(test)]
mod tests {
    #[test]
    fn literals_cannot_be_escaped() {
        assert_eq!(super::literal("app"), "$fg$app$fg$");
        assert_eq!(super::literal("a$fg$b"), "$fgx$a$fg$b$fgx$");
    }
}

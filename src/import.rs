//! `floodgate import-pgbouncer pgbouncer.ini [userlist.txt]`: an equivalent `floodgate.toml`
//! from a PgBouncer configuration, and the list of every setting that could not be mapped, with
//! the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The result: the TOML text and the settings left behind (`section.key: why`).
pub struct Imported {
    pub toml: String,
    pub unmapped: Vec<String>,
}

/// An ini file flattened: `(section, key, value)` in order, `%include`s followed.
fn read_ini(
    path: &Path,
    depth: usize,
    out: &mut Vec<(String, String, String)>,
    section: &mut String,
) -> Result<(), String> {
    if depth > 10 {
        return Err(format!("{}: %include nested too deep", path.display()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(included) = line.strip_prefix("%include") {
            let included = PathBuf::from(included.trim());
            let included = match included.is_absolute() {
                true => included,
                false => path.parent().unwrap_or(Path::new(".")).join(included),
            };
            read_ini(&included, depth + 1, out, section)?;
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            *section = name.trim().to_ascii_lowercase();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "{} line {}: expected key = value",
                path.display(),
                i + 1
            ));
        };
        out.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    Ok(())
}

/// `host=a port=5432 dbname='x y'` as key/value pairs.
fn conninfo(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_owned();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            value.push(next);
                        }
                    }
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        pairs.push((key, value));
        rest = remaining.trim_start();
    }
    pairs
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// PgBouncer's seconds (fractions allowed) as a Floodgate duration.
fn seconds(value: &str) -> Option<String> {
    let secs: f64 = value.trim().parse().ok()?;
    if secs.is_nan() || secs < 0.0 || !secs.is_finite() {
        return None;
    }
    let ms = (secs * 1000.0).round() as u64;
    Some(match ms % 1000 {
        0 => format!("\"{}s\"", ms / 1000),
        _ => format!("\"{ms}ms\""),
    })
}

fn list(value: &str) -> String {
    let items: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(quote)
        .collect();
    format!("[{}]", items.join(", "))
}

/// `[pgbouncer]` settings that map one to one: (PgBouncer key, Floodgate key, kind).
const SAME: &[(&str, &str, Kind)] = &[
    ("pool_mode", "pool_mode", Kind::Text),
    ("default_pool_size", "default_pool_size", Kind::Number),
    ("min_pool_size", "min_pool_size", Kind::Number),
    ("reserve_pool_size", "reserve_pool_size", Kind::Number),
    (
        "reserve_pool_timeout",
        "reserve_pool_timeout",
        Kind::Seconds,
    ),
    ("max_client_conn", "max_client_conn", Kind::Number),
    ("max_db_connections", "max_db_connections", Kind::Number),
    ("max_user_connections", "max_user_connections", Kind::Number),
    (
        "max_db_client_connections",
        "max_db_client_connections",
        Kind::Number,
    ),
    (
        "max_user_client_connections",
        "max_user_client_connections",
        Kind::Number,
    ),
    (
        "max_prepared_statements",
        "max_prepared_statements",
        Kind::Number,
    ),
    ("max_packet_size", "max_packet_size", Kind::Number),
    ("server_lifetime", "server_lifetime", Kind::Seconds),
    ("server_idle_timeout", "server_idle_timeout", Kind::Seconds),
    (
        "server_connect_timeout",
        "server_connect_timeout",
        Kind::Seconds,
    ),
    ("server_login_retry", "server_login_retry", Kind::Seconds),
    ("query_timeout", "query_timeout", Kind::Seconds),
    ("query_wait_timeout", "query_wait_timeout", Kind::Seconds),
    ("client_idle_timeout", "client_idle_timeout", Kind::Seconds),
    (
        "client_login_timeout",
        "client_login_timeout",
        Kind::Seconds,
    ),
    (
        "idle_transaction_timeout",
        "idle_transaction_timeout",
        Kind::Seconds,
    ),
    ("stats_period", "stats_period", Kind::Seconds),
    ("server_reset_query", "server_reset_query", Kind::Text),
    (
        "server_reset_query_always",
        "server_reset_query_always",
        Kind::Bool,
    ),
    (
        "ignore_startup_parameters",
        "ignore_startup_parameters",
        Kind::List,
    ),
    (
        "track_extra_parameters",
        "track_extra_parameters",
        Kind::List,
    ),
    ("admin_users", "admin_users", Kind::List),
    ("stats_users", "stats_users", Kind::List),
    ("auth_hba_file", "hba_file", Kind::Text),
    ("auth_query", "auth_query", Kind::Text),
    ("auth_user", "auth_user", Kind::Text),
    ("auth_dbname", "auth_dbname", Kind::Text),
    ("client_tls_sslmode", "client_tls_sslmode", Kind::Text),
    ("client_tls_cert_file", "client_tls_cert_file", Kind::Text),
    ("client_tls_key_file", "client_tls_key_file", Kind::Text),
    ("client_tls_ca_file", "client_tls_ca_file", Kind::Text),
    ("client_tls_protocols", "client_tls_protocols", Kind::Text),
    ("client_tls_ciphers", "client_tls_ciphers", Kind::Text),
    ("server_tls_sslmode", "server_tls_sslmode", Kind::Text),
    ("server_tls_ca_file", "server_tls_ca_file", Kind::Text),
    ("server_tls_cert_file", "server_tls_cert_file", Kind::Text),
    ("server_tls_key_file", "server_tls_key_file", Kind::Text),
    ("server_tls_protocols", "server_tls_protocols", Kind::Text),
    ("server_tls_ciphers", "server_tls_ciphers", Kind::Text),
];

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Number,
    Seconds,
    Bool,
    List,
}

/// Why a known PgBouncer setting has no Floodgate equivalent.
fn why_not(key: &str) -> &'static str {
    match key {
        "logfile" | "syslog" | "syslog_ident" | "syslog_facility" | "log_connections"
        | "log_disconnections" | "log_pooler_errors" | "log_stats" | "verbose" => {
            "Floodgate logs to stderr; RUST_LOG sets the level"
        }
        "pidfile" | "user" => "run Floodgate under your service manager",
        "unix_socket_dir" | "unix_socket_mode" | "unix_socket_group" => {
            "Floodgate listens on TCP only (databases without a host still reach PostgreSQL over unix_socket_dir)"
        }
        k if k.starts_with("client_tls_") || k.starts_with("server_tls_") => {
            "rustls chooses key-exchange groups itself (no ECDH curve or DH parameters to set)"
        }
        k if k.starts_with("tcp_") || k == "so_reuseport" => {
            "the kernel's socket defaults are used"
        }
        k if k.starts_with("dns_") => "host names are resolved at each connect",
        "pkt_buf" | "sbuf_loopcnt" | "max_packet_size_bytes" => {
            "buffers are sized by Floodgate (see README, Memory)"
        }
        "application_name_add_host"
        | "disable_pqexec"
        | "conffile"
        | "service_name"
        | "job_name"
        | "autodb_idle_timeout"
        | "server_round_robin"
        | "server_check_query"
        | "server_check_delay"
        | "server_fast_close"
        | "peer_id" => "no equivalent in Floodgate",
        _ => "unknown to this importer",
    }
}

/// Converts `ini` (and the users of `userlist`, or of its `auth_file`).
pub fn import(ini: &Path, userlist: Option<&Path>) -> Result<Imported, String> {
    let mut entries = Vec::new();
    read_ini(ini, 0, &mut entries, &mut String::new())?;
    let mut unmapped = Vec::new();
    let mut general: Vec<String> = Vec::new();
    let mut databases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut listen_addr, mut listen_port) = ("127.0.0.1".to_owned(), "6432".to_owned());
    // PgBouncer reaches a database with no `host` over the Unix socket in `unix_socket_dir`
    // (default /tmp; empty turns Unix sockets off).
    let socket_dir = entries
        .iter()
        .rev()
        .find(|(section, key, _)| section == "pgbouncer" && key == "unix_socket_dir")
        .map_or("/tmp", |(_, _, value)| value.as_str());
    let mut auth_file = None;
    for (section, key, value) in &entries {
        match section.as_str() {
            "pgbouncer" => match key.as_str() {
                "listen_addr" => {
                    listen_addr = match value.as_str() {
                        "*" => "0.0.0.0".into(),
                        "localhost" => "127.0.0.1".into(),
                        v if v.contains(',') => {
                            unmapped.push(format!(
                                "[pgbouncer] listen_addr = {v}: Floodgate listens on one address (the first is used)"
                            ));
                            v.split(',').next().unwrap_or("127.0.0.1").trim().to_owned()
                        }
                        v => v.to_owned(),
                    };
                }
                "listen_port" => listen_port = value.clone(),
                "auth_type" => match value.as_str() {
                    "md5" | "scram-sha-256" | "trust" => {
                        general.push(format!("auth_type = {}", quote(value)));
                    }
                    "hba" => unmapped.push(
                        "[pgbouncer] auth_type = hba: set hba_file (auth_hba_file is imported)".into(),
                    ),
                    other => unmapped.push(format!(
                        "[pgbouncer] auth_type = {other}: Floodgate has trust, md5 and scram-sha-256"
                    )),
                },
                "auth_file" => auth_file = Some(PathBuf::from(value)),
                key => match SAME.iter().find(|(k, _, _)| *k == key) {
                    Some((_, ours, kind)) => {
                        let converted = match kind {
                            Kind::Text => Some(quote(value)),
                            Kind::Number => value.parse::<u64>().ok().map(|n| n.to_string()),
                            Kind::Seconds => seconds(value),
                            Kind::Bool => match value.as_str() {
                                "1" | "on" | "yes" | "true" => Some("true".into()),
                                "0" | "off" | "no" | "false" => Some("false".into()),
                                _ => None,
                            },
                            Kind::List => Some(list(value)),
                        };
                        match converted {
                            Some(v) => general.push(format!("{ours} = {v}")),
                            None => unmapped.push(format!("[pgbouncer] {key} = {value}: not a valid value")),
                        }
                    }
                    None => unmapped.push(format!("[pgbouncer] {key}: {}", why_not(key))),
                },
            },
            "databases" => {
                if key == "*" {
                    unmapped.push(
                        "[databases] *: Floodgate has no fallback database; list each database".into(),
                    );
                    continue;
                }
                let mut lines = Vec::new();
                let pairs = conninfo(value);
                if !pairs.iter().any(|(k, _)| k == "host") {
                    match socket_dir {
                        "" => unmapped.push(format!(
                            "[databases] {key}: no host and unix_socket_dir is empty; Floodgate will use 127.0.0.1"
                        )),
                        dir if dir.starts_with('@') => unmapped.push(format!(
                            "[databases] {key}: no host, and abstract-namespace sockets ({dir}) are not supported; Floodgate will use 127.0.0.1"
                        )),
                        dir => lines.push(format!("host = {}", quote(dir))),
                    }
                }
                for (k, v) in pairs {
                    match k.as_str() {
                        "host" if v.starts_with('@') => {
                            unmapped.push(format!(
                                "[databases] {key} host={v}: abstract-namespace Unix sockets are not supported; give the socket's directory"
                            ));
                            continue;
                        }
                        "host" if v.contains(',') => unmapped.push(format!(
                            "[databases] {key} host={v}: one host per database (the first is used)"
                        )),
                        "host" | "dbname" | "user" | "password" | "pool_mode" => {}
                        "port" | "pool_size" | "min_pool_size" | "reserve_pool" | "max_db_connections" => {}
                        other => {
                            unmapped.push(format!("[databases] {key} {other}={v}: not supported per database"));
                            continue;
                        }
                    }
                    let line = match k.as_str() {
                        "host" => format!("host = {}", quote(v.split(',').next().unwrap_or(&v))),
                        "dbname" | "user" | "password" | "pool_mode" => format!("{k} = {}", quote(&v)),
                        "reserve_pool" => format!("reserve_pool_size = {v}"),
                        _ => format!("{k} = {v}"),
                    };
                    lines.push(line);
                }
                databases.insert(key.clone(), lines);
            }
            "users" => unmapped.push(format!(
                "[users] {key}: per-user pool settings are not supported"
            )),
            other => unmapped.push(format!("[{other}] {key}: section not supported")),
        }
    }
    let userlist = userlist.map(Path::to_path_buf).or(auth_file);
    let users = match &userlist {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            crate::auth::userlist::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Vec::new(),
    };
    let mut toml = format!(
        "# Imported from {} by `floodgate import-pgbouncer`.\n[floodgate]\nlisten = {}\n",
        ini.display(),
        quote(&format!("{listen_addr}:{listen_port}"))
    );
    for line in &general {
        toml += line;
        toml.push('\n');
    }
    for (name, password) in &users {
        toml += &format!(
            "\n[[users]]\nname = {}\npassword = {}\n",
            quote(name),
            quote(password)
        );
    }
    for (name, lines) in &databases {
        toml += &format!("\n[databases.{}]\n", quote(name));
        for line in lines {
            toml += line;
            toml.push('\n');
        }
    }
    crate::config::Config::from_toml_str(&toml)
        .map_err(|e| format!("the imported configuration is not valid: {e}\n{toml}"))?;
    Ok(Imported { toml, unmapped })
}

#[cfg(test)]
mod tests {
    #[test]
    fn connection_strings_with_quotes() {
        let pairs = super::conninfo("host=db1 port=5433 dbname='my db' password='it\\'s'");
        assert_eq!(
            pairs,
            [
                ("host".to_string(), "db1".to_string()),
                ("port".into(), "5433".into()),
                ("dbname".into(), "my db".into()),
                ("password".into(), "it's".into()),
            ]
        );
        assert_eq!(super::seconds("0.5").as_deref(), Some("\"500ms\""));
        assert_eq!(super::seconds("120").as_deref(), Some("\"120s\""));
        assert_eq!(super::seconds("x"), None);
    }
}

//! The TOML configuration: schema, defaults and validation.
//!
//! Keys PgBouncer also has keep PgBouncer's names and meanings. Unknown keys are rejected (serde's
//! `deny_unknown_fields`) so a typo never silently falls back to a default; the TOML parser
//! reports the offending key and its line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The TOML it was read from: the console's SET changes a key in it and reads it again.
    #[serde(skip)]
    pub raw: toml::Table,
    /// `hba_file`, parsed.
    #[serde(skip)]
    pub hba: Option<std::sync::Arc<crate::auth::hba::Hba>>,
    /// The `*_tls_*` settings with their certificates read.
    #[serde(skip)]
    pub tls: crate::tls::Tls,
    /// Global settings (`[floodgate]`).
    #[serde(default)]
    pub floodgate: General,
    /// The HTTP endpoint (`[metrics]`): Prometheus, probes, the kill switch for automation.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Users clients may log in as (`[[users]]`).
    #[serde(default)]
    pub users: Vec<User>,
    /// Databases clients may ask for, by the name they ask for (`[databases.NAME]`).
    #[serde(default)]
    pub databases: BTreeMap<String, Database>,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthType {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// When a server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// At the end of every transaction (`ReadyForQuery 'I'` with nothing in flight).
    Transaction,
    /// When the client disconnects; the server is reset with `server_reset_query` first.
    Session,
}

/// `[floodgate]`: global settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    pub listen: SocketAddr,
    /// Threads serving clients; 0 = automatic (half the CPU cores, at least one).
    pub workers: usize,
    pub admin_users: Vec<String>,
    /// Users who may log in to the console and run SHOW commands only.
    pub stats_users: Vec<String>,
    pub auth_type: AuthType,
    pub max_client_conn: usize,
    /// Clients per database at once; 0 = no limit.
    pub max_db_client_connections: usize,
    /// Clients per user at once; 0 = no limit.
    pub max_user_client_connections: usize,
    /// Clients per client IP address at once; 0 = no limit.
    pub max_client_conn_per_ip: usize,
    /// New connections per second per client IP (token bucket); 0 = no limit.
    pub client_conn_rate_per_ip: f64,
    /// Connections an IP may open at once before the rate applies (at least 1).
    pub client_conn_burst_per_ip: usize,
    pub pool_mode: PoolMode,
    pub default_pool_size: usize,
    /// Servers each pool keeps open even when idle (refilled when they close).
    pub min_pool_size: usize,
    /// Server connections per database, all users together; 0 = no limit.
    pub max_db_connections: usize,
    /// Server connections per upstream user, all databases together; 0 = no limit.
    pub max_user_connections: usize,
    /// Extra servers per pool for clients that waited `reserve_pool_timeout`; 0 = none.
    pub reserve_pool_size: usize,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub reserve_pool_timeout: Duration,
    /// Named prepared statements kept per server connection in transaction mode (LRU);
    /// 0 turns tracking off (statements pass through as in session mode).
    pub max_prepared_statements: usize,
    /// Named prepared statements one client may have at once (transaction mode); 0 = no limit.
    pub max_client_prepared_statements: usize,
    /// Bytes the proxy-wide statement registry may take (the statements' text).
    pub max_prepared_statement_bytes: usize,
    /// How many Floodgate processes run against the same databases: a number (for the
    /// connection math only) or `"auto"` (live instances share `connection_budget`, see
    /// [`crate::budget`]).
    pub instances: Instances,
    /// Largest share of a server's usable connections this configuration may take.
    pub connection_budget: f64,
    /// This instance's name on its server connections (`application_name = floodgate/<id>`);
    /// default: host name + ':' + listen port.
    pub instance_id: Option<String>,
    /// With `instances = "auto"`: how often each instance reads the server's limits and who is
    /// connected, and resizes its share.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub budget_period: Duration,
    /// Largest message a client may send, in bytes (the 5-byte header is checked before reading).
    pub max_packet_size: usize,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub query_wait_timeout: Duration,
    /// A query running this long is cancelled (57014); 0 = off.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub query_timeout: Duration,
    /// A client idle this long inside a transaction is disconnected (25P03); 0 = off.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub idle_transaction_timeout: Duration,
    /// A client idle this long outside a transaction is disconnected (57P05); 0 = off.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub client_idle_timeout: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub client_login_timeout: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub server_connect_timeout: Duration,
    /// Longest back-off between login attempts after the upstream failed or refused.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub server_login_retry: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub server_idle_timeout: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub server_lifetime: Duration,
    /// How long SIGTERM waits for transactions in flight before closing them.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub shutdown_timeout: Duration,
    /// Run before a server is reused in session mode.
    pub server_reset_query: String,
    /// Also run `server_reset_query` after every transaction in transaction mode (for session
    /// state the proxy cannot see, such as advisory locks taken inside functions).
    pub server_reset_query_always: bool,
    /// Session parameters carried between servers per client, besides the reported ones and
    /// `search_path` (PgBouncer's name); clients may set them at startup.
    pub track_extra_parameters: Vec<String>,
    /// Startup parameters accepted from clients but not applied (PgBouncer's name).
    pub ignore_startup_parameters: Vec<String>,
    /// The period SHOW STATS averages are computed over.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub stats_period: Duration,
    /// Users in PgBouncer's userlist.txt format, besides `[[users]]` (which win).
    pub auth_file: Option<std::path::PathBuf>,
    /// Who may log in from where, in pg_hba.conf format.
    pub hba_file: Option<std::path::PathBuf>,
    /// Failed logins from one IP within `auth_failure_window` before it is refused; 0 = off.
    pub auth_failure_limit: usize,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub auth_failure_window: Duration,
    /// How long an IP over `auth_failure_limit` is refused.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub auth_failure_ban: Duration,
    /// Looks up users not configured here in PostgreSQL, as this user (its password in
    /// `[[users]]`).
    pub auth_user: Option<String>,
    /// The query (`$1` = the user name); default: `pg_shadow`, honouring VALID UNTIL.
    pub auth_query: Option<String>,
    /// The database the lookup runs in (default: the one the client asked for).
    pub auth_dbname: Option<String>,
    /// TLS with clients: disable, allow, prefer, require, verify-ca, verify-full.
    pub client_tls_sslmode: crate::tls::SslMode,
    pub client_tls_cert_file: Option<std::path::PathBuf>,
    pub client_tls_key_file: Option<std::path::PathBuf>,
    /// The CA client certificates must be signed by (verify-ca, verify-full).
    pub client_tls_ca_file: Option<std::path::PathBuf>,
    pub client_tls_protocols: String,
    pub client_tls_ciphers: String,
    /// TLS with servers (default prefer: TLS when the server offers it).
    pub server_tls_sslmode: crate::tls::SslMode,
    /// The CA server certificates must be signed by (verify-ca, verify-full).
    pub server_tls_ca_file: Option<std::path::PathBuf>,
    /// A client certificate to present to servers.
    pub server_tls_cert_file: Option<std::path::PathBuf>,
    pub server_tls_key_file: Option<std::path::PathBuf>,
    pub server_tls_protocols: String,
    pub server_tls_ciphers: String,
}

/// `[floodgate]` keys a reload or SET cannot change: they keep their value until a restart.
pub const NEEDS_RESTART: [&str; 5] = [
    "listen",
    "workers",
    "track_extra_parameters",
    "max_prepared_statement_bytes",
    "instance_id",
];

/// `instances`: a fixed count (the connection math only) or `"auto"` (a budget shared by the
/// instances PostgreSQL sees connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    Count(usize),
    Auto,
}

impl Instances {
    pub fn is_auto(self) -> bool {
        self == Instances::Auto
    }

    /// As written in the file.
    pub fn count_or_auto(self) -> String {
        match self {
            Instances::Count(n) => n.to_string(),
            Instances::Auto => "\"auto\"".into(),
        }
    }

    /// The count for the static connection math (`"auto"` counts as one: this instance).
    pub fn count(self) -> usize {
        match self {
            Instances::Count(n) => n.max(1),
            Instances::Auto => 1,
        }
    }
}

impl<'de> Deserialize<'de> for Instances {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Instances;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of instances or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Instances, E> {
                usize::try_from(v)
                    .map(Instances::Count)
                    .map_err(|_| E::custom("instances must be a positive number or \"auto\""))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Instances, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Instances, E> {
                match v {
                    "auto" => Ok(Instances::Auto),
                    _ => Err(E::custom(format!(
                        "`{v}` is not a number of instances or \"auto\""
                    ))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for Instances {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Instances::Count(n) => s.serialize_u64(*n as u64),
            Instances::Auto => s.serialize_str("auto"),
        }
    }
}

/// Longest `instance_id`: it must fit in `application_name` (63 bytes) after
/// `floodgate/budget=<claim>/`.
pub const MAX_INSTANCE_ID: usize = 40;

impl General {
    /// `instance_id`, or host name + ':' + listen port (the tail kept when that is longer than
    /// [`MAX_INSTANCE_ID`]: pod names differ at their end).
    pub fn instance_id(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let id = format!("{}:{}", host_name(), self.listen.port());
        let id: String = id.chars().filter(char::is_ascii_graphic).collect();
        id[id.len().saturating_sub(MAX_INSTANCE_ID)..].to_owned()
    }
}

/// This machine's host name (`localhost` if it cannot be read).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match rc {
        0 if len > 0 => String::from_utf8_lossy(&buf[..len]).into_owned(),
        _ => "localhost".into(),
    }
}

impl General {
    /// Every setting and its value as text, in file order (SHOW CONFIG).
    pub fn settings(&self) -> Vec<(String, String)> {
        let Ok(toml::Value::Table(table)) = toml::Value::try_from(self) else {
            return Vec::new();
        };
        table
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                (key, text)
            })
            .collect()
    }
}

impl Default for General {
    fn default() -> Self {
        General {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            workers: 0,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            auth_type: AuthType::ScramSha256,
            max_client_conn: 10_000,
            max_db_client_connections: 0,
            max_user_client_connections: 0,
            max_client_conn_per_ip: 0,
            client_conn_rate_per_ip: 0.0,
            client_conn_burst_per_ip: 10,
            pool_mode: PoolMode::Transaction,
            default_pool_size: 20,
            min_pool_size: 0,
            max_db_connections: 0,
            max_user_connections: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            max_prepared_statements: 200,
            max_client_prepared_statements: 1000,
            max_prepared_statement_bytes: 64 << 20,
            max_packet_size: 1_073_741_823,
            instances: Instances::Count(1),
            connection_budget: 0.7,
            instance_id: None,
            budget_period: Duration::from_secs(1),
            query_wait_timeout: Duration::from_secs(120),
            query_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            client_login_timeout: Duration::from_secs(60),
            server_connect_timeout: Duration::from_secs(15),
            server_login_retry: Duration::from_secs(15),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(30),
            server_reset_query: "DISCARD ALL".into(),
            server_reset_query_always: false,
            track_extra_parameters: Vec::new(),
            ignore_startup_parameters: vec!["extra_float_digits".into()],
            stats_period: Duration::from_secs(60),
            auth_file: None,
            hba_file: None,
            auth_failure_limit: 20,
            auth_failure_window: Duration::from_secs(60),
            auth_failure_ban: Duration::from_secs(60),
            auth_user: None,
            auth_query: None,
            auth_dbname: None,
            client_tls_sslmode: crate::tls::SslMode::Disable,
            client_tls_cert_file: None,
            client_tls_key_file: None,
            client_tls_ca_file: None,
            client_tls_protocols: "secure".into(),
            client_tls_ciphers: "default".into(),
            server_tls_sslmode: crate::tls::SslMode::Prefer,
            server_tls_ca_file: None,
            server_tls_cert_file: None,
            server_tls_key_file: None,
            server_tls_protocols: "secure".into(),
            server_tls_ciphers: "default".into(),
        }
    }
}

/// `[metrics]`: the HTTP endpoint for Prometheus, probes and the kill switch.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: SocketAddr,
    /// Bearer token for `POST /admin/...` (none: those paths answer 404).
    pub admin_token: Option<String>,
    /// A file holding the token (its first line), e.g. a mounted secret; read at each request.
    pub admin_token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("listen", &self.listen)
            .field("admin_token_file", &self.admin_token_file)
            .finish_non_exhaustive()
    }
}

/// `[[users]]`: one user clients may log in as.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plain text, an md5 hash (`md5` + 32 hex digits) or a SCRAM secret (`SCRAM-SHA-256$...`).
    pub password: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `[databases.NAME]`: where a database clients ask for really lives.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// A host name or IP address, or a directory (starting with `/`) where PostgreSQL's Unix
    /// socket `.s.PGSQL.<port>` lives, as in libpq and PgBouncer.
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Upstream database name (default: the key).
    pub dbname: Option<String>,
    /// Upstream login (default: the client's user).
    pub user: Option<String>,
    /// Upstream password (default: the client user's).
    pub password: Option<String>,
    /// Overrides `default_pool_size`.
    pub pool_size: Option<usize>,
    /// Overrides the global `pool_mode`.
    pub pool_mode: Option<PoolMode>,
    /// Overrides the global `min_pool_size`.
    pub min_pool_size: Option<usize>,
    /// Overrides the global `max_db_connections`.
    pub max_db_connections: Option<usize>,
    /// Overrides the global `reserve_pool_size`.
    pub reserve_pool_size: Option<usize>,
    /// Overrides the global `reserve_pool_timeout`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub reserve_pool_timeout: Option<Duration>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_port() -> u16 {
    5432
}

/// Durations are strings with units ("250ms", "5s", "10m"); "0" and "0s" mean off.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration ({e}); write a number with a unit, e.g. \"250ms\", \"5s\", \"10m\""
        ))
    })
}

fn show_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    match d.is_zero() {
        true => s.serialize_str("0s"),
        false => s.serialize_str(&humantime::format_duration(*d).to_string()),
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_str(&text)
    }

    /// Parses and validates configuration text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.raw = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.read_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `auth_file` (its users join `[[users]]`, which win), `hba_file` and the TLS
    /// certificates.
    fn read_files(&mut self) -> Result<(), ConfigError> {
        let read = |key: &str, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "[floodgate] {key}: cannot read {}: {e}",
                    path.display()
                ))
            })
        };
        if let Some(path) = self.floodgate.auth_file.clone() {
            let text = read("auth_file", &path)?;
            let users = crate::auth::userlist::parse(&text).map_err(|e| {
                ConfigError::Invalid(format!("[floodgate] auth_file {}: {e}", path.display()))
            })?;
            for (name, password) in users {
                if self.user(&name).is_none() {
                    self.users.push(User { name, password });
                }
            }
        }
        if let Some(path) = self.floodgate.hba_file.clone() {
            let text = read("hba_file", &path)?;
            let hba = crate::auth::hba::Hba::parse(&text).map_err(|e| {
                ConfigError::Invalid(format!("[floodgate] hba_file {}: {e}", path.display()))
            })?;
            self.hba = Some(std::sync::Arc::new(hba));
        }
        self.tls = crate::tls::load(&self.floodgate)
            .map_err(|e| ConfigError::Invalid(format!("[floodgate] {e}")))?;
        Ok(())
    }

    /// This configuration with `[floodgate] key` set to `value` (the console's SET). `value` is
    /// taken as TOML (a number, `true`, a quoted string); anything else as a string.
    pub fn with_setting(&self, key: &str, value: &str) -> Result<Config, ConfigError> {
        if NEEDS_RESTART.contains(&key) {
            return Err(ConfigError::Invalid(format!(
                "{key} cannot be changed while running: change the file and restart"
            )));
        }
        if !General::default().settings().iter().any(|(k, _)| k == key) {
            return Err(ConfigError::Invalid(format!(
                "unknown setting `{key}` (SHOW CONFIG lists them)"
            )));
        }
        let typed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"));
        let attempts = typed
            .into_iter()
            .chain(std::iter::once(toml::Value::String(value.to_owned())));
        let mut last = None;
        for value in attempts {
            let mut raw = self.raw.clone();
            let section = raw
                .entry("floodgate")
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let toml::Value::Table(section) = section {
                section.insert(key.to_owned(), value);
            }
            let parsed: Result<Config, _> = raw.clone().try_into();
            match parsed {
                Ok(mut config) => {
                    config.raw = raw;
                    config.read_files()?;
                    config.validate()?;
                    return Ok(config);
                }
                Err(e) => last = Some(ConfigError::Parse(format!("{key}: {}", e.message()))),
            }
        }
        Err(last.unwrap_or_else(|| ConfigError::Invalid(format!("bad value for {key}"))))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let g = &self.floodgate;
        if g.default_pool_size == 0 {
            return invalid("[floodgate] default_pool_size must be at least 1".into());
        }
        if g.max_client_conn == 0 {
            return invalid("[floodgate] max_client_conn must be at least 1".into());
        }
        if !(g.client_conn_rate_per_ip >= 0.0 && g.client_conn_rate_per_ip.is_finite()) {
            return invalid("[floodgate] client_conn_rate_per_ip must be 0 (off) or a positive number of connections per second".into());
        }
        if !(g.connection_budget > 0.0 && g.connection_budget <= 1.0) {
            return invalid(
                "[floodgate] connection_budget must be a fraction in (0, 1], e.g. 0.7".into(),
            );
        }
        if let Some(id) = &g.instance_id
            && (id.is_empty()
                || id.len() > MAX_INSTANCE_ID
                || !id.chars().all(|c| c.is_ascii_graphic()))
        {
            return invalid(format!(
                "[floodgate] instance_id `{id}`: 1 to {MAX_INSTANCE_ID} printable ASCII \
                 characters without spaces (it goes into application_name)"
            ));
        }
        if g.instances == Instances::Count(0) {
            return invalid("[floodgate] instances must be at least 1, or \"auto\"".into());
        }
        if g.budget_period < Duration::from_millis(100) {
            return invalid("[floodgate] budget_period must be at least 100ms".into());
        }
        if g.max_packet_size < 1024 {
            return invalid("[floodgate] max_packet_size must be at least 1024 bytes".into());
        }
        for name in &g.track_extra_parameters {
            if !crate::params::is_valid_name(name) {
                return invalid(format!(
                    "[floodgate] track_extra_parameters: `{name}` is not a parameter name \
                     (letters, digits and _, optionally two parts joined by a dot)"
                ));
            }
        }
        if crate::params::names(&g.track_extra_parameters).len() > crate::params::MAX_TRACKED {
            return invalid(format!(
                "[floodgate] track_extra_parameters: at most {} parameters are tracked in all",
                crate::params::MAX_TRACKED
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for user in &self.users {
            if user.name.is_empty() {
                return invalid("[[users]] name must not be empty".into());
            }
            if !seen.insert(user.name.as_str()) {
                return invalid(format!("[[users]] name `{}` appears twice", user.name));
            }
        }
        for (name, db) in &self.databases {
            if db.pool_size == Some(0) {
                return invalid(format!("[databases.{name}] pool_size must be at least 1"));
            }
            if db.host.is_empty() {
                return invalid(format!("[databases.{name}] host must not be empty"));
            }
            if db.host.starts_with('@') {
                return invalid(format!(
                    "[databases.{name}] host = \"{}\": abstract-namespace Unix sockets are not \
                     supported; give the socket's directory (e.g. \"/var/run/postgresql\") or a host",
                    db.host
                ));
            }
        }
        Ok(())
    }

    /// Worker threads to run: `workers`, or half the CPU cores (at least one) when it is 0.
    /// The proxy usually shares its machine with the database or the application; on a 2-core
    /// box one thread costs less CPU per transaction than two (see README, Performance).
    pub fn worker_threads(&self) -> usize {
        match self.floodgate.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }

    /// The configured user called `name`.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Pool size for database `name`.
    pub fn pool_size(&self, db: &Database) -> usize {
        db.pool_size.unwrap_or(self.floodgate.default_pool_size)
    }

    /// Pool mode for database `name`.
    pub fn pool_mode(&self, db: &Database) -> PoolMode {
        db.pool_mode.unwrap_or(self.floodgate.pool_mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[floodgate]\nlisten = \"127.0.0.1:1\"\npool_sise = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool_sise"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_duration_names_key_and_format() {
        let err = Config::from_toml_str("[floodgate]\nquery_wait_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("query_wait_timeout"), "{err}");
        assert!(err.contains("5s"), "{err}");
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_toml_str(
            "[floodgate]\nquery_wait_timeout = \"250ms\"\n[databases.app]\nport = 5433\npool_size = 3\n",
        )
        .unwrap();
        assert_eq!(c.floodgate.query_wait_timeout, Duration::from_millis(250));
        assert_eq!(c.floodgate.default_pool_size, 20);
        let db = &c.databases["app"];
        assert_eq!((db.host.as_str(), db.port), ("127.0.0.1", 5433));
        assert_eq!(c.pool_size(db), 3);
        assert_eq!(c.pool_mode(db), PoolMode::Transaction);
    }

    #[test]
    fn a_socket_directory_is_a_host_and_abstract_sockets_are_refused() {
        let parse = |host: &str| {
            Config::from_toml_str(&format!("[databases.app]\nhost = \"{host}\"\n"))
                .map_err(|e| e.to_string())
        };
        let c = parse("/var/run/postgresql").unwrap();
        assert_eq!(c.databases["app"].host, "/var/run/postgresql");
        let err = parse("@pg").unwrap_err();
        assert!(err.contains("[databases.app] host"), "{err}");
        assert!(err.contains("abstract-namespace"), "{err}");
    }

    #[test]
    fn instances_is_a_number_or_auto() {
        let parse = |v: &str| Config::from_toml_str(&format!("[floodgate]\ninstances = {v}\n"));
        assert_eq!(parse("3").unwrap().floodgate.instances, Instances::Count(3));
        assert_eq!(
            parse("\"auto\"").unwrap().floodgate.instances,
            Instances::Auto
        );
        for bad in ["\"many\"", "-1", "0", "1.5"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("instances"), "{bad}: {err}");
        }
        let shown = parse("\"auto\"").unwrap().floodgate.settings();
        assert!(
            shown.contains(&("instances".into(), "auto".into())),
            "{shown:?}"
        );
        let set = parse("2")
            .unwrap()
            .with_setting("instances", "auto")
            .unwrap();
        assert_eq!(
            set.floodgate.instances,
            Instances::Auto,
            "SET instances = auto"
        );
    }

    #[test]
    fn instance_id_defaults_to_host_and_port_and_fits_application_name() {
        let c = Config::from_toml_str("[floodgate]\nlisten = \"127.0.0.1:7001\"\n").unwrap();
        let id = c.floodgate.instance_id();
        assert!(id.ends_with(":7001") && id.len() <= MAX_INSTANCE_ID, "{id}");
        let named = Config::from_toml_str("[floodgate]\ninstance_id = \"pod-a\"\n").unwrap();
        assert_eq!(named.floodgate.instance_id(), "pod-a");
        for bad in ["\"\"", "\"has space\"", &format!("\"{}\"", "x".repeat(41))] {
            let text = format!("[floodgate]\ninstance_id = {bad}\n");
            let err = Config::from_toml_str(&text).unwrap_err().to_string();
            assert!(err.contains("instance_id"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_enum_value_is_named() {
        let err = Config::from_toml_str("[floodgate]\nauth_type = \"password\"\n").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("auth_type") && err.contains("scram-sha-256"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn shipped_example_config_is_valid() {
        let text = include_str!("../config/floodgate.toml");
        let config = super::Config::from_toml_str(text).expect("config/floodgate.toml parses");
        assert_eq!(config.databases["app"].port, 5432);
    }
}

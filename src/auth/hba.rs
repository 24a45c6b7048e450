//! `hba_file`: who may log in from where, in pg_hba.conf's format. Each line is
//! `TYPE DATABASE USER ADDRESS METHOD`: TYPE `host` (any TCP client), `hostssl` (over TLS; no
//! client uses TLS yet, so it never matches), `hostnossl`; DATABASE and USER `all` or
//! comma-separated names; ADDRESS `all` or a CIDR (`10.0.0.0/8`, `::1/128`); METHOD `trust`,
//! `md5`, `scram-sha-256` or `reject`. The first line that matches decides; none matching
//! refuses, as in PostgreSQL. `local` lines are skipped (Floodgate has no Unix socket).

use std::net::IpAddr;

use crate::config::AuthType;

/// What a matching line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Auth(AuthType),
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    HostSsl,
    HostNoSsl,
}

#[derive(Debug, Clone)]
enum Names {
    All,
    List(Vec<String>),
}

impl Names {
    fn parse(field: &str) -> Names {
        match field {
            "all" => Names::All,
            list => Names::List(
                list.split(',')
                    .map(|s| s.trim_matches('"').to_owned())
                    .collect(),
            ),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Names::All => true,
            Names::List(names) => names.iter().any(|n| n == name),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    kind: Kind,
    databases: Names,
    users: Names,
    /// Network and prefix length; `None` = all addresses.
    net: Option<(IpAddr, u8)>,
    method: Method,
}

/// The parsed file.
#[derive(Debug, Clone, Default)]
pub struct Hba {
    rules: Vec<Rule>,
}

/// The decision for one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Authenticate this way (line number).
    Allow(AuthType, usize),
    /// A `reject` line (its number).
    Reject(usize),
    /// No line matched.
    NoMatch,
}

impl Hba {
    pub fn parse(text: &str) -> Result<Hba, String> {
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| format!("line {}: {why}", i + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let kind = match fields[0] {
                "local" => continue,
                "host" => Kind::Host,
                "hostssl" => Kind::HostSsl,
                "hostnossl" => Kind::HostNoSsl,
                other => return Err(bad(format!("unknown connection type `{other}`"))),
            };
            let [_, database, user, address, method, ..] = fields[..] else {
                return Err(bad("expected TYPE DATABASE USER ADDRESS METHOD".into()));
            };
            let net = match address {
                "all" => None,
                cidr => Some(parse_cidr(cidr).ok_or_else(|| {
                    bad(format!(
                        "`{cidr}` is not an address in CIDR form (e.g. 10.0.0.0/8)"
                    ))
                })?),
            };
            let method = match method {
                "trust" => Method::Auth(AuthType::Trust),
                "md5" => Method::Auth(AuthType::Md5),
                "scram-sha-256" => Method::Auth(AuthType::ScramSha256),
                "reject" => Method::Reject,
                other => {
                    return Err(bad(format!(
                        "method `{other}` is not supported (trust, md5, scram-sha-256, reject)"
                    )));
                }
            };
            rules.push(Rule {
                line: i + 1,
                kind,
                databases: Names::parse(database),
                users: Names::parse(user),
                net,
                method,
            });
        }
        Ok(Hba { rules })
    }

    /// The first line matching a login of `user` to `database` from `ip`.
    pub fn decide(&self, ip: IpAddr, tls: bool, database: &str, user: &str) -> Decision {
        let ip = canonical(ip);
        for rule in &self.rules {
            let kind_matches = match rule.kind {
                Kind::Host => true,
                Kind::HostSsl => tls,
                Kind::HostNoSsl => !tls,
            };
            if kind_matches
                && rule.databases.matches(database)
                && rule.users.matches(user)
                && rule.net.is_none_or(|(net, bits)| in_net(ip, net, bits))
            {
                return match rule.method {
                    Method::Auth(auth) => Decision::Allow(auth, rule.line),
                    Method::Reject => Decision::Reject(rule.line),
                };
            }
        }
        Decision::NoMatch
    }
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((canonical(addr), bits))
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_line_decides() {
        let hba = Hba::parse(
            "# comment\nlocal all all trust\nhost app bad 0.0.0.0/0 reject\n\
             hostssl all all all scram-sha-256\nhost app,other all 127.0.0.0/8 md5\n\
             host all ops ::1/128 trust\n",
        )
        .unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(hba.decide(lo, false, "app", "bad"), Decision::Reject(3));
        assert_eq!(
            hba.decide(lo, false, "other", "x"),
            Decision::Allow(AuthType::Md5, 5)
        );
        assert_eq!(
            hba.decide(lo, true, "app", "x"),
            Decision::Allow(AuthType::ScramSha256, 4)
        );
        assert_eq!(hba.decide(lo, false, "third", "x"), Decision::NoMatch);
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            hba.decide(v6, false, "third", "ops"),
            Decision::Allow(AuthType::Trust, 6)
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(hba.decide(mapped, false, "app", "bad"), Decision::Reject(3));
        let err = Hba::parse("host all all 10.0.0.0 md5\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        let err = Hba::parse("host all all all ident\n").unwrap_err();
        assert!(err.contains("ident"), "{err}");
    }
}

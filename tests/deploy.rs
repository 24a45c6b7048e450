//! What can be checked of the docker-compose demo without Docker: the compose file and the
//! Dockerfile name the images and settings they should, Prometheus accepts its config
//! (`promtool check config`), Floodgate accepts its config, and every metric the Grafana
//! dashboard queries exists in a live `/metrics`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use floodgate::pgcluster::HbaAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

/// Runs a Python snippet (python3 with PyYAML: Debian's python3-yaml) and returns its stdout.
async fn python(script: &str, arg: &str) -> String {
    let out = run_tool("python3", vec!["-c".into(), script.into(), arg.into()]).await;
    assert!(out.status.success(), "python3 failed: {}", tool_text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn compose_file_and_dockerfile_name_what_they_should() {
    let summary = python(
        "import sys, yaml\n\
         c = yaml.safe_load(open(sys.argv[1]))\n\
         for name, s in sorted(c['services'].items()):\n\
         \x20   print(name, s.get('image', 'build:' + str(s.get('build'))), ','.join(s.get('profiles', [])))\n",
        &repo("docker-compose.yml"),
    )
    .await;
    let services: BTreeSet<&str> = summary.lines().collect();
    let expected = BTreeSet::from([
        "floodgate build:. ",
        "grafana grafana/grafana:11.1.0 ",
        "load postgres:16 load",
        "postgres postgres:16 ",
        "prometheus prom/prometheus:v2.53.0 ",
    ]);
    assert_eq!(services, expected, "docker-compose.yml services");
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(froms, ["rust:1-bookworm AS build", "debian:bookworm-slim"]);
    assert!(
        dockerfile.contains("\nUSER floodgate\n"),
        "runs as a non-root user"
    );
    assert!(dockerfile.contains("HEALTHCHECK"), "has a HEALTHCHECK");
    assert!(dockerfile.contains("--release"), "release build");
    floodgate::config::Config::load(Path::new(&repo("deploy/floodgate.toml")))
        .expect("deploy/floodgate.toml is a valid Floodgate config");
}

#[tokio::test]
async fn prometheus_accepts_its_config() {
    let out = run_tool(
        "promtool",
        vec![
            "check".into(),
            "config".into(),
            repo("deploy/prometheus/prometheus.yml"),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "promtool check config (apt-get install prometheus): {}",
        tool_text(&out)
    );
}

/// Every `floodgate_*` metric a dashboard expression names, without histogram suffixes.
async fn dashboard_metrics() -> BTreeSet<String> {
    let exprs = python(
        "import sys, json\n\
         d = json.load(open(sys.argv[1]))\n\
         for p in d['panels']:\n\
         \x20   for t in p['targets']:\n\
         \x20       print(t['expr'])\n",
        &repo("deploy/grafana/dashboards/floodgate.json"),
    )
    .await;
    let mut names = BTreeSet::new();
    for expr in exprs.lines() {
        let mut rest = expr;
        while let Some(at) = rest.find("floodgate_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string();
            names.insert(base);
        }
    }
    names
}

async fn get(addr: std::net::SocketAddr, path: &str, token: Option<&str>, method: &str) -> String {
    within(path, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    })
    .await
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_exists() {
    let wanted = dashboard_metrics().await;
    assert!(wanted.len() >= 10, "{wanted:?}");
    let cluster = start_cluster(HbaAuth::ScramSha256, 100).await;
    let opts = ProxyOpts {
        pool_size: 2,
        extra: vec!["client_idle_timeout = \"1s\"".into()],
        ..ProxyOpts::default()
    };
    let toml = proxy_toml(&cluster, &opts)
        + "\n[metrics]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"tok\"\n";
    let proxy = start_proxy(&toml).await;
    let env = Env { cluster, proxy };
    let addr = env.proxy.metrics_addr().expect("metrics");
    // Traffic that makes every family appear: transactions, an error, a refusal, a timeout,
    // a server closed.
    let app = env.connect().await;
    scalar(&app, "SELECT 1").await;
    assert!(app.simple_query("SELECT 1/0").await.is_err());
    assert!(env.try_connect("app", Some("wrong"), "app").await.is_err());
    let idle = env.connect().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(idle);
    let reconnect = get(addr, "/admin/reconnect", Some("tok"), "POST").await;
    assert!(reconnect.starts_with("HTTP/1.1 200"), "{reconnect}");
    let metrics = get(addr, "/metrics", None, "GET").await;
    let present: BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = wanted.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics /metrics lacks: {missing:?}"
    );
}

/// deploy/kubernetes/: every manifest parses and has what a production rollout needs.
#[tokio::test]
async fn kubernetes_manifests_have_what_production_needs() {
    let script = r#"
import sys, glob, yaml
docs = {}
for path in sorted(glob.glob(sys.argv[1] + '/*.yaml')):
    for doc in yaml.safe_load_all(open(path)):
        docs[doc['kind']] = doc
problems = []
def need(ok, what):
    if not ok:
        problems.append(what)
need(set(docs) >= {'ConfigMap', 'Secret', 'Deployment', 'Service', 'HorizontalPodAutoscaler', 'PodDisruptionBudget', 'ServiceMonitor'}, 'kinds: ' + ','.join(sorted(docs)))
pod = docs['Deployment']['spec']['template']['spec']
c = pod['containers'][0]
need(c['readinessProbe']['httpGet']['path'] == '/readyz', 'readiness on /readyz')
need(c['livenessProbe']['httpGet']['path'] == '/healthz', 'liveness on /healthz')
need('preStop' in c['lifecycle'], 'preStop')
need('cpu' in c['resources']['requests'] and 'memory' in c['resources']['requests'], 'resource requests')
need(pod['securityContext']['runAsNonRoot'] is True, 'non-root')
need(c['securityContext']['readOnlyRootFilesystem'] is True, 'read-only root filesystem')
need(pod['terminationGracePeriodSeconds'] > 35, 'grace period longer than preStop + shutdown_timeout')
hpa = docs['HorizontalPodAutoscaler']['spec']
need(hpa['metrics'][0]['resource']['name'] == 'cpu', 'HPA on CPU')
need(hpa['behavior']['scaleUp']['stabilizationWindowSeconds'] == 0, 'fast scale-up')
pdb = docs['PodDisruptionBudget']['spec']
need('maxUnavailable' in pdb or 'minAvailable' in pdb, 'PDB budget')
ports = {p['name'] for p in docs['Service']['spec']['ports']}
need(ports == {'postgres', 'metrics'}, 'service ports')
print('\n'.join(problems))
sys.stdout.write('@@CONFIG@@' + docs['ConfigMap']['data']['floodgate.toml'])
"#;
    let out = python(script, &repo("deploy/kubernetes")).await;
    let (problems, config) = out.split_once("@@CONFIG@@").expect("config printed");
    assert!(problems.trim().is_empty(), "manifest problems:\n{problems}");
    // The ConfigMap's file is a valid Floodgate configuration (with the Secret's files).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("userlist.txt"), "\"app\" \"pw\"\n").unwrap();
    std::fs::write(dir.path().join("admin_token"), "tok\n").unwrap();
    let config = config.replace("/etc/floodgate/secret", &dir.path().display().to_string());
    let config = floodgate::config::Config::from_toml_str(&config).expect("the ConfigMap's config");
    assert!(
        config.user("app").is_some(),
        "users come from the Secret's userlist.txt"
    );
    assert!(
        config.metrics.is_some(),
        "the probes' endpoint is configured"
    );
    assert!(
        config.floodgate.instances.is_auto(),
        "replicas share the connection budget (instances = \"auto\")"
    );
}

//! Client authentication at the proxy (md5, scram-sha-256, trust) in front of upstreams that
//! use md5, scram-sha-256 or trust themselves.

mod common;

use common::*;
use floodgate::pgcluster::HbaAuth;

/// Good login works; a wrong password and an unknown user get the same 28P01 error (so the
/// answer does not reveal which users exist); an unknown database gets 3D000.
async fn check_password_auth(proxy_auth: &'static str, upstream: HbaAuth) {
    let opts = ProxyOpts {
        auth_type: proxy_auth,
        ..ProxyOpts::default()
    };
    let env = Env::start(upstream, opts).await;
    let ctx = format!("proxy {proxy_auth}, upstream {upstream:?}");

    let ok = env.try_connect("app", Some("secret"), "app").await;
    let ok = ok.unwrap_or_else(|e| panic!("{ctx}: good login refused: {e}"));
    assert_eq!(scalar(&ok, "SELECT current_user").await, "app", "{ctx}");

    let wrong = env
        .try_connect("app", Some("not-the-password"), "app")
        .await
        .err();
    let wrong = wrong.unwrap_or_else(|| panic!("{ctx}: wrong password accepted"));
    assert_eq!(sqlstate(&wrong), "28P01", "{ctx}: wrong password: {wrong}");

    let unknown = env.try_connect("nobody", Some("secret"), "app").await.err();
    let unknown = unknown.unwrap_or_else(|| panic!("{ctx}: unknown user accepted"));
    assert_eq!(
        sqlstate(&unknown),
        "28P01",
        "{ctx}: unknown user: {unknown}"
    );
    assert_eq!(
        db_message(&wrong).replace("\"app\"", "\"USER\""),
        db_message(&unknown).replace("\"nobody\"", "\"USER\""),
        "{ctx}: wrong password and unknown user must be indistinguishable"
    );
    assert!(
        !db_message(&wrong).is_empty(),
        "{ctx}: the error has a message"
    );

    let no_db = env
        .try_connect("app", Some("secret"), "no_such_db")
        .await
        .err();
    let no_db = no_db.unwrap_or_else(|| panic!("{ctx}: unknown database accepted"));
    assert_eq!(
        sqlstate(&no_db),
        "3D000",
        "{ctx}: unknown database: {no_db}"
    );

    // Refused logins did not disturb the established client.
    assert_eq!(
        scalar(&ok, "SELECT 'still here'").await,
        "still here",
        "{ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_clients_in_front_of_md5_upstream() {
    check_password_auth("md5", HbaAuth::Md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_clients_in_front_of_scram_upstream() {
    check_password_auth("md5", HbaAuth::ScramSha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_clients_in_front_of_scram_upstream() {
    check_password_auth("scram-sha-256", HbaAuth::ScramSha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_clients_in_front_of_md5_upstream() {
    check_password_auth("scram-sha-256", HbaAuth::Md5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_clients_in_front_of_trust_upstream() {
    check_password_auth("scram-sha-256", HbaAuth::Trust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_lets_any_configured_user_in_and_no_one_else() {
    let opts = ProxyOpts {
        auth_type: "trust",
        users: vec![
            ("app".into(), "secret".into()),
            ("reporter".into(), "r3p0rt".into()),
        ],
        ..ProxyOpts::default()
    };
    let env = Env::start(HbaAuth::ScramSha256, opts).await;
    env.sql(
        "postgres",
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE reporter LOGIN PASSWORD 'r3p0rt'",
    )
    .await;

    for (user, password) in [("app", None), ("app", Some("anything")), ("reporter", None)] {
        let c = env.try_connect(user, password, "app").await;
        let c = c.unwrap_or_else(|e| panic!("trust refused {user} (password {password:?}): {e}"));
        assert_eq!(scalar(&c, "SELECT current_user").await, user);
    }

    let stranger = env.try_connect("stranger", None, "app").await.err();
    let stranger = stranger.expect("trust let in a user that is not configured");
    assert_eq!(sqlstate(&stranger), "28P01", "{stranger}");
    let no_db = env.try_connect("app", None, "no_such_db").await.err();
    let no_db = no_db.expect("trust let a client into an unknown database");
    assert_eq!(sqlstate(&no_db), "3D000", "{no_db}");
}

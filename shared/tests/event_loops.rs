//! HTTP event loops (`Work::event_loops`): connections spread over several
//! single-threaded loops sharing one port, and every loop stops with the service.

use std::collections::BTreeSet;

use axum::{Router, routing::get};
use shared::service::{Infra, Needs, Service, Work};
use testkit::{DEADLINE, TestEnv};

#[tokio::test]
async fn connections_spread_over_the_event_loops_and_all_stop_with_the_service() {
    let env = TestEnv::new();
    let router = Router::new().route(
        "/thread",
        get(|| async { std::thread::current().name().unwrap_or_default().to_owned() }),
    );
    let infra = Infra::connect("loops", &env.settings(), Needs::default())
        .await
        .expect("service connects");
    let work = Work {
        event_loops: 3,
        ..Work::default()
    };
    let service = Service::start(infra, 0, router, work)
        .await
        .expect("service starts");
    let port = service.port();
    let stop = service.shutdown_token();
    let task = tokio::spawn(service.run_until_stopped());

    let mut threads = BTreeSet::new();
    for _ in 0..24 {
        // A new connection each time: the kernel picks a loop per connection.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let response = client
            .get(format!("http://127.0.0.1:{port}/thread"))
            .send()
            .await
            .expect("the service answers");
        assert_eq!(response.status(), 200);
        threads.insert(response.text().await.expect("a body"));
    }
    // 24 connections over 3 sockets all landing on one: about 1 in 10^11.
    assert!(
        threads.len() >= 2,
        "one loop served everything: {threads:?}"
    );
    assert!(
        threads.iter().any(|t| t.starts_with("http-loop-")),
        "no extra loop served a request: {threads:?}"
    );

    stop.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("every loop stops within the deadline")
        .expect("the service task does not panic")
        .expect("the service stops cleanly");
}

//! `commerce bench floor` against the real PostgreSQL, with the real pgbench: each
//! workload runs the transaction it names, and its scratch database is gone afterwards.

use std::time::Duration;

use bench::Target;
use bench::floor::{self, Workload};
use sqlx::Connection as _;
use testkit::TestEnv;

#[tokio::test]
async fn each_workload_runs_its_own_transaction_and_leaves_no_database() {
    let env = TestEnv::new();
    let settings = env.settings();
    let target = Target {
        gateway: String::new(),
        namespace: env.namespace.clone(),
        postgres: settings.postgres.clone(),
    };
    for (workload, transaction) in [
        (Workload::Insert, "commerce-bench-floor-"),
        (Workload::TpcbLike, "TPC-B"),
    ] {
        let floor = floor::run(&target, workload, 2, Duration::from_secs(1))
            .await
            .expect("pgbench");
        assert_eq!(floor.workload, workload);
        assert!(
            floor.pgbench_transaction.contains(transaction),
            "{workload:?} ran {:?}",
            floor.pgbench_transaction
        );
        assert!(
            floor.transactions > 0 && floor.commits_per_s > 0.0,
            "{floor:?}"
        );
    }
    let mut server = sqlx::PgConnection::connect(&settings.postgres.database_url("postgres"))
        .await
        .expect("PostgreSQL");
    let left: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1 || '%'")
            .bind(&env.namespace)
            .fetch_all(&mut server)
            .await
            .expect("pg_database");
    assert!(left.is_empty(), "left behind: {left:?}");
}

//! Connections to a database server send without Nagle's delay (`store::nodelay`). A test
//! binary of its own: another test's connection caught between opening and its
//! `after_connect` would otherwise be counted.

use sessionfleet::store::{Engine, Pool, nodelay};
use sessionfleet::testing::TestDb;

/// Connections each test opens at once, so the check covers more than the first.
const CONNECTIONS: usize = 3;

async fn every_connection_to_the_server_has_nodelay(engine: Engine) {
    let t = TestDb::new(engine).await;
    match t.db.pool() {
        Pool::Postgres(p) => open_several(p).await,
        Pool::MySql(p) => open_several(p).await,
        Pool::Sqlite(_) => unreachable!("SQLite has no socket"),
    }
    let url = url::Url::parse(&t.url).unwrap();
    let servers = nodelay::Server::new(
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap(),
        false,
    )
    .expect("a TCP server")
    .addresses()
    .await;
    assert!(!servers.is_empty(), "{} resolves", t.url);
    let (connections, with_nodelay) = nodelay::count_connections_to(&servers);
    assert!(
        connections >= CONNECTIONS,
        "{engine}: found {connections} connections to {servers:?}"
    );
    assert_eq!(
        with_nodelay, connections,
        "{engine}: connections without TCP_NODELAY"
    );
    t.drop_db().await;
}

/// Makes the pool open `CONNECTIONS` connections by holding them at once; given back, they
/// stay open in the pool.
async fn open_several<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) {
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        held.push(pool.acquire().await.expect("connection"));
    }
}

#[tokio::test]
async fn postgres_connections_send_without_nagle_delay() {
    every_connection_to_the_server_has_nodelay(Engine::Postgres).await;
}

#[tokio::test]
async fn mysql_connections_send_without_nagle_delay() {
    every_connection_to_the_server_has_nodelay(Engine::MySql).await;
}

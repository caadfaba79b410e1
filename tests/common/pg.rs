//! A PostgreSQL schema of its own for one integration test: created on the machine's PostgreSQL
//! (`TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`), handed to the server as
//! its `DATABASE_URL` through libpq's `options=-csearch_path`, and dropped when the test ends.
//!
//! Under `CI=true` an unreachable PostgreSQL fails the test; elsewhere the test is skipped with a note.
#![allow(dead_code)]

use tokio_postgres::NoTls;

/// The server tests use when `TEST_POSTGRES_URL` is unset.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A throwaway schema, dropped on drop.
pub struct PgSchema {
    /// The `DATABASE_URL` that points a server at this schema.
    pub url: String,
    /// The PostgreSQL address (host:port), for a proxy in front of it.
    pub upstream: std::net::SocketAddr,
    base: String,
    name: String,
}

fn base_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Runs SQL on its own short connection.
fn execute(url: &str, sql: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(connection);
        let result = client.batch_execute(sql).await.map_err(|e| e.to_string());
        drop(client);
        let _ = task.await;
        result
    })
}

impl PgSchema {
    /// Creates a schema with a random name, or `None` (skip) when PostgreSQL is unreachable outside CI.
    pub fn create() -> Option<PgSchema> {
        let base = base_url();
        let name = format!("ns_it_{}", uuid::Uuid::now_v7().simple());
        if let Err(e) = execute(&base, &format!("CREATE SCHEMA {name}")) {
            if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
                panic!("PostgreSQL at {base} is unreachable and CI=true requires it: {e}");
            }
            eprintln!("note: skipping a PostgreSQL test: {e}");
            return None;
        }
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-csearch_path%3D{name}");
        let upstream = "127.0.0.1:5432".parse().unwrap();
        Some(PgSchema {
            url,
            upstream,
            base,
            name,
        })
    }

    /// This schema's URL with the host and port replaced (to go through a proxy).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        self.url.replace("127.0.0.1:5432", &addr.to_string())
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = execute(
            &self.base,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

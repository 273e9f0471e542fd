//! # sessionfleet
//!
//! The library behind the `sessionfleet` CLI and the `sessionfleet-worker` fleet member. It
//! keeps an application's session tables healthy — cleanup, analytics, database
//! maintenance — on SQLite, PostgreSQL and MySQL/MariaDB, with jobs carried by Redis and a
//! lease plus a database-side fence so only one maintenance process touches a database at a
//! time.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`config`]: settings, their sources and validation;
//! - [`store`]: engines, connections, dialects, the session schema;
//! - [`fence`]: the fencing table every mutating transaction advances;
//! - [`lease`]: the per-target Redis lease, its keeper, and running an operation under it;
//! - [`seed`]: deterministic demo data;
//! - [`lease`]: the Redis lease whose token the database's fence enforces;
//! - [`schedule`]: the scheduler's ticks, exactly one job per tick across replicas;
//! - [`ops`]: the operations, plain async functions `(db, params, cancel) -> report`;
//! - [`jobs`]: the job envelope, kinds and queues;
//! - [`queue`]: apalis-redis set up and guarded; enqueue, results, dead letters, janitor;
//! - [`runner`]: the seam between a claimed job and the operations;
//! - [`dispatch`]: decode a job's parameters and run its operation under the lease;
//! - [`telemetry`]: logging setup;
//! - [`secret`], [`backoff`]: small cross-cutting helpers.

#![warn(missing_docs)]

pub mod backoff;
pub mod config;
pub mod dispatch;
pub mod fence;
pub mod jobs;
pub mod lease;
pub mod ops;
pub mod queue;
pub mod runner;
pub mod scan;
pub mod schedule;
pub mod secret;
pub mod seed;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use tokio_util::sync::CancellationToken;

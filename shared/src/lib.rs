//! The one library every Commerce service uses, so a service's own code is only its
//! domain: settings, telemetry, HTTP conventions, database bootstrap, and the messaging
//! kernel (outbox, consumer runner, retries, dead letters).

pub mod admin;
pub mod auth;
pub mod config;
pub mod db;
pub mod events;
pub mod http;
pub mod messaging;
pub mod metrics;
pub mod service;
pub mod telemetry;

pub use config::Settings;

/// Every binary linking this crate (each service, the CLI, the tests) allocates with
/// mimalloc: request handling allocates a lot, from several threads, and glibc's
/// allocator took an eighth of the gateway's time under load.
// Not in this crate's own unit tests: they link the crate a second time through testkit,
// which brings the allocator along.
#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

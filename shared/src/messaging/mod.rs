//! The messaging kernel: every service talks through it the same way (DESIGN.md §4).

mod broker;
mod consumer;
pub mod dead_letter;
mod envelope;
pub mod headers;
pub mod inbox;
pub mod outbox;
pub mod subscriptions;
mod topology;

pub use broker::{Broker, BrokerError};
pub use consumer::{Consumer, Failure, Handler, HandlerError, Observer, Outcome, Retry};
pub use dead_letter::DeadLetterStore;
pub use envelope::{Envelope, NewEvent};
pub use outbox::{Outbox, Relay};
pub use topology::Topology;

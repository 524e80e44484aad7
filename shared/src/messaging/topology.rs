//! Names and declarations of the exchanges and queues (DESIGN.md §4).
//!
//! - `<ns>.events`: topic exchange, routing key = event type.
//! - `<ns>.<service>`: the service's quorum queue, bound to the keys it handles; messages
//!   the broker gives up on (delivery limit) go to `<ns>.dlx` with key `<service>`.
//! - `<ns>.<service>.dlq`: bound to `<ns>.dlx` with key `<service>`.
//! - `<ns>.<service>.retry.<ms>ms`: one wait queue per retry delay (a queue expires
//!   messages only at its head, so one delay each); expired messages go back to the
//!   service's own queue through the default exchange.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use super::subscriptions;
use crate::config::MessagingSettings;

#[derive(Clone, Debug)]
pub struct Topology {
    namespace: String,
    service: String,
    retry_delays: Vec<Duration>,
    delivery_limit: u32,
}

fn long(s: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.into()))
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    // At-least-once dead-lettering: the broker keeps a message until the target queue
    // confirms it, instead of dropping it on the way (needs reject-publish overflow).
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

impl Topology {
    /// `service` is the short name used in queue and database names (`order`).
    pub fn new(namespace: &str, service: &str, messaging: &MessagingSettings) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            retry_delays: messaging.retry_delays(),
            delivery_limit: messaging.delivery_limit,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    pub fn queue(&self) -> String {
        self.queue_of(&self.service)
    }

    /// The queue `<ns>.<service>` of any service of this namespace.
    pub fn queue_of(&self, service: &str) -> String {
        format!("{}.{service}", self.namespace)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.{}.dlq", self.namespace, self.service)
    }

    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }

    pub fn retry_queue(&self, delay: Duration) -> String {
        format!(
            "{}.{}.retry.{}ms",
            self.namespace,
            self.service,
            delay.as_millis()
        )
    }

    /// The exchanges every service publishes to.
    pub async fn declare_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Direct,
                options,
                FieldTable::default(),
            )
            .await
    }

    /// The service's queue bound to `routing_keys`, its dead-letter queue and its retry
    /// wait queues. Idempotent.
    pub async fn declare_consumer(
        &self,
        channel: &Channel,
        routing_keys: &[&str],
    ) -> lapin::Result<()> {
        self.declare_dead_letter_queue(channel).await?;
        self.declare_bound_queue(channel, &self.service, routing_keys)
            .await?;

        for delay in &self.retry_delays {
            let mut args = quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), long(""));
            args.insert("x-dead-letter-routing-key".into(), long(self.queue()));
            channel
                .queue_declare(self.retry_queue(*delay).into(), durable(), args)
                .await?;
        }
        Ok(())
    }

    /// The exchanges, then every service's queue bound to the events it subscribes to
    /// ([`subscriptions::SUBSCRIPTIONS`]): what a relay declares before it publishes, so
    /// an event reaches a subscriber that has not declared its own queue yet. Its
    /// dead-letter and retry queues are left to the service itself. Idempotent.
    pub async fn declare_subscribers(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_exchanges(channel).await?;
        for (service, keys) in subscriptions::SUBSCRIPTIONS {
            self.declare_bound_queue(channel, service, keys).await?;
        }
        Ok(())
    }

    /// `<ns>.<service>` with the same arguments whoever declares it (else the broker
    /// refuses the second declaration), bound to `keys`.
    async fn declare_bound_queue(
        &self,
        channel: &Channel,
        service: &str,
        keys: &[&str],
    ) -> lapin::Result<()> {
        let queue: ShortString = self.queue_of(service).into();
        let mut args = quorum_args();
        args.insert(
            "x-dead-letter-exchange".into(),
            long(self.dead_letter_exchange()),
        );
        args.insert("x-dead-letter-routing-key".into(), long(service));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        channel
            .queue_declare(queue.clone(), durable(), args)
            .await?;
        for key in keys {
            channel
                .queue_bind(
                    queue.clone(),
                    self.events_exchange().into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// The dead-letter queue, bound to the dead-letter exchange with the service's name.
    pub async fn declare_dead_letter_queue(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_exchanges(channel).await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("quorum"));
        channel
            .queue_declare(self.dead_letter_queue().into(), durable(), args)
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue().into(),
                self.dead_letter_exchange().into(),
                self.service.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Deletes this service's queues (tests and teardown). Deleting a queue that does not
    /// exist succeeds.
    pub async fn delete_queues(&self, channel: &Channel) -> lapin::Result<()> {
        let mut names = vec![self.queue(), self.dead_letter_queue()];
        names.extend(self.retry_delays.iter().map(|d| self.retry_queue(*d)));
        for name in names {
            channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Deletes the namespace's exchanges (tests and teardown).
    pub async fn delete_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
        for name in [self.events_exchange(), self.dead_letter_exchange()] {
            channel
                .exchange_delete(name.into(), Default::default())
                .await?;
        }
        Ok(())
    }
}

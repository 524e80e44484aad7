//! Sends the mails one event calls for, each at most once per (fact, recipient,
//! template), however often the event is delivered, republished under a new id, or its
//! handler retried. The fact is what the mail is about: the order paid or cancelled, the
//! user registered, the review.
//!
//! One event can mail several people (a receipt and a notice per seller). Each mail sent
//! is recorded at once in the `notifications` table, in its own short transaction on a
//! pool of its own, outside the consumer's transaction: if a later mail of the same event
//! fails, the consumer's rollback does not forget the ones already sent, and the retry
//! skips them. The remaining window: a crash (or a database failure that outlasts the
//! record's own retries) after the SMTP server accepted a mail and before its row is
//! written sends that mail again on the retry. Its Message-ID is the same both times, so
//! a receiving system can drop the copy.

use std::collections::HashSet;
use std::time::Duration;

use lettre::message::Mailbox;
use shared::db::Warm;
use shared::messaging::{Envelope, HandlerError, Retry};
use uuid::Uuid;

use crate::mail::{Mailer, Outgoing, Receipt, Templates};

/// One mail an event calls for.
#[derive(Debug)]
pub struct Mail {
    pub recipient_id: Uuid,
    pub to_email: String,
    pub to_name: String,
    pub template: &'static str,
    pub context: serde_json::Value,
}

/// A mail to send, or why it cannot be written yet.
#[derive(Debug)]
pub enum Plan {
    Send(Mail),
    /// Data the mail needs has not arrived (its event is still on its way): retried.
    Missing {
        recipient_id: Uuid,
        template: &'static str,
        what: String,
    },
}

#[derive(Clone)]
pub struct Notifier {
    pub mailer: Mailer,
    pub templates: Templates,
    /// Only for the `notifications` table: handlers hold connections of the main pool for
    /// their whole transaction, so a shared pool could leave none to record a send. Its
    /// connections are kept between uses, like the consumer's.
    pub log: Warm,
}

/// Pauses between tries to record a mail already sent; a failure after them leaves the
/// mail to be sent again on retry.
const RECORD_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

impl Notifier {
    /// Sends every planned mail not sent before for `fact` (the order, user or review
    /// the event is about: a copy of the event under another id finds the mails sent).
    /// Each recipient is tried even when another fails; the error then names all that
    /// failed. A template or address that can never work makes the error permanent
    /// (dead-lettered at once, to be fixed and replayed); otherwise it is transient
    /// (retried).
    pub async fn deliver(
        &self,
        event: &Envelope,
        fact: Uuid,
        plans: Vec<Plan>,
    ) -> Result<(), HandlerError> {
        let sent = self.sent(fact).await?;
        let total = plans.len();
        let mut failures: Vec<(Retry, String)> = Vec::new();
        for plan in plans {
            match plan {
                Plan::Missing {
                    recipient_id,
                    template,
                    what,
                } => failures.push((
                    Retry::Transient,
                    format!("{template} to {recipient_id}: {what}"),
                )),
                Plan::Send(mail) => {
                    if sent.contains(&(mail.recipient_id, mail.template.to_owned())) {
                        tracing::info!(
                            template = mail.template,
                            recipient_id = %mail.recipient_id,
                            "already sent for this fact; skipped"
                        );
                        continue;
                    }
                    if let Err(error) = self.send(event, fact, &mail).await {
                        failures.push((
                            error.retry,
                            format!(
                                "{} to {}: {:#}",
                                mail.template, mail.recipient_id, error.error
                            ),
                        ));
                    }
                }
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        let permanent = failures.iter().any(|(r, _)| *r == Retry::Permanent);
        let error = anyhow::anyhow!(
            "{} of {total} mails not sent: {}",
            failures.len(),
            failures
                .into_iter()
                .map(|(_, m)| m)
                .collect::<Vec<_>>()
                .join("; ")
        );
        Err(if permanent {
            HandlerError::permanent(error)
        } else {
            HandlerError::transient(error)
        })
    }

    async fn sent(&self, fact: Uuid) -> Result<HashSet<(Uuid, String)>, HandlerError> {
        let mut conn = self.log.take().await.map_err(HandlerError::transient)?;
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT recipient_id, template FROM notifications WHERE fact_id = $1")
                .bind(fact)
                .fetch_all(&mut *conn)
                .await
                .map_err(HandlerError::transient)?;
        self.log.give_back(conn);
        Ok(rows.into_iter().collect())
    }

    async fn send(&self, event: &Envelope, fact: Uuid, mail: &Mail) -> Result<(), HandlerError> {
        let template = mail.template;
        let failed = || metrics::counter!("notification_failures_total", "template" => template);
        let rendered = self
            .templates
            .render(template, &mail.context)
            .await
            .map_err(|e| {
                failed().increment(1);
                HandlerError::permanent(e)
            })?;
        let address = mail.to_email.parse().map_err(|e| {
            failed().increment(1);
            HandlerError::permanent(anyhow::anyhow!(
                "{:?} is not an email address: {e}",
                mail.to_email
            ))
        })?;
        let domain = self.mailer.from_address().email.domain().to_owned();
        let outgoing = Outgoing {
            to: Mailbox::new(Some(mail.to_name.clone()), address),
            rendered: &rendered,
            message_id: format!("<{fact}.{template}.{}@{domain}>", mail.recipient_id),
        };
        let message = self
            .mailer
            .message(&outgoing)
            .map_err(HandlerError::permanent)?;
        let receipt = self.mailer.send(message).await.map_err(|e| {
            failed().increment(1);
            tracing::warn!(template, recipient_id = %mail.recipient_id, error = format!("{e:#}"), "mail not sent");
            HandlerError::transient(e)
        })?;
        metrics::counter!("notifications_sent_total", "template" => template).increment(1);

        let mut pauses = RECORD_RETRIES.iter();
        loop {
            let recorded = self
                .record(event, fact, mail, &rendered.subject, &receipt)
                .await;
            match (recorded, pauses.next()) {
                (Ok(_), _) => break,
                (Err(error), Some(pause)) => {
                    tracing::warn!(%error, "could not record a sent mail; trying again");
                    tokio::time::sleep(*pause).await;
                }
                (Err(error), None) => {
                    tracing::error!(%error, template, recipient_id = %mail.recipient_id,
                        "a mail was sent but could not be recorded; a retry will send it again");
                    return Err(HandlerError::transient(error));
                }
            }
        }
        tracing::info!(
            template,
            recipient_id = %mail.recipient_id,
            transport = receipt.transport,
            "mail sent"
        );
        Ok(())
    }

    /// Writes the row that says `mail` was sent for `fact`.
    async fn record(
        &self,
        event: &Envelope,
        fact: Uuid,
        mail: &Mail,
        subject: &str,
        receipt: &Receipt,
    ) -> Result<(), sqlx::Error> {
        let mut conn = self.log.take().await?;
        sqlx::query(
            "INSERT INTO notifications (id, event_id, fact_id, event_type, recipient_id, \
             to_address, template, subject, transport, receipt) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT ON CONSTRAINT notifications_once DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(event.id)
        .bind(fact)
        .bind(&event.event_type)
        .bind(mail.recipient_id)
        .bind(&mail.to_email)
        .bind(mail.template)
        .bind(subject)
        .bind(receipt.transport)
        .bind(&receipt.detail)
        .execute(&mut *conn)
        .await?;
        self.log.give_back(conn);
        Ok(())
    }
}

//! The payment of one order as a state machine over the facts seen from the saga
//! (docs/SAGA.md). Each event records its fact on the order's row (locked, so events of
//! one order are handled one at a time), then the machine takes every step the facts
//! now call for. The decision depends only on the set of facts, never on their order,
//! and each step is a provider call with the idempotency key of the order and step: a
//! retry after a crash repeats the call and gets Stripe's stored answer, never a second
//! charge.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use serde::Serialize;
use shared::events::{
    Event, OrderCreated, PaymentAuthorized, PaymentCompleted, PaymentFailed, PaymentRefunded,
    PaymentVoided,
};
use shared::messaging::{Envelope, HandlerError, Outbox};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::ledger::{self, Entry};
use crate::provider::{Authorization, AuthorizeRequest, PaymentProvider, ProviderError, Step};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Authorized,
    Captured,
    Failed,
    Voided,
    Refunded,
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Authorized => "authorized",
            Self::Captured => "captured",
            Self::Failed => "failed",
            Self::Voided => "voided",
            Self::Refunded => "refunded",
            Self::Skipped => "skipped",
        }
    }

    fn parse(text: &str) -> Result<Self, HandlerError> {
        Ok(match text {
            "pending" => Self::Pending,
            "authorized" => Self::Authorized,
            "captured" => Self::Captured,
            "failed" => Self::Failed,
            "voided" => Self::Voided,
            "refunded" => Self::Refunded,
            "skipped" => Self::Skipped,
            other => {
                return Err(HandlerError::permanent(anyhow!(
                    "unknown payment status {other:?}"
                )));
            }
        })
    }
}

/// What the saga told us about an order.
#[derive(Clone, Debug)]
pub enum Fact {
    Ordered(OrderCreated),
    Reserved,
    Rejected,
    /// With inventory's reason: `payment_failed`, `expired` or `cancelled`.
    Released(String),
    Cancelled,
}

impl Fact {
    fn name(&self) -> &'static str {
        match self {
            Self::Ordered(_) => "ordered",
            Self::Reserved => "reserved",
            Self::Rejected => "rejected",
            Self::Released(_) => "released",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One order's payment, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub status: Status,
    pub customer_id: Option<Uuid>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub payment_method: Option<String>,
    pub provider: Option<String>,
    pub intent_id: Option<String>,
    pub failure_code: Option<String>,
    pub reserved: bool,
    pub rejected: bool,
    pub released: Option<String>,
    pub cancelled: bool,
}

/// The next step the facts call for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Authorize,
    Capture,
    Void,
    Refund,
    /// order.created after the order was known rejected or cancelled: hold nothing.
    Skip,
    /// order.created after the reservation was released: hold nothing, but say the
    /// payment is void, since order-svc cancels an expired order on `payment.voided`.
    Abandon,
}

impl Payment {
    /// Stock is gone for good: rejected, or the order cancelled.
    fn stock_lost(&self) -> bool {
        self.rejected || self.cancelled
    }

    /// The step the facts call for, if any. Terminal states call for nothing.
    pub fn next_action(&self) -> Option<Action> {
        match self.status {
            Status::Pending if self.amount_cents.is_none() => None,
            Status::Pending if self.stock_lost() => Some(Action::Skip),
            Status::Pending if self.released.is_some() => Some(Action::Abandon),
            Status::Pending => Some(Action::Authorize),
            // A release always follows the reservation it undoes, so it wins over it.
            Status::Authorized if self.stock_lost() || self.released.is_some() => {
                Some(Action::Void)
            }
            Status::Authorized if self.reserved => Some(Action::Capture),
            // After an expiry release inventory re-takes the stock on payment.completed
            // or rejects, and only a rejection (or a cancel) refunds.
            Status::Captured if self.stock_lost() => Some(Action::Refund),
            Status::Authorized
            | Status::Captured
            | Status::Failed
            | Status::Voided
            | Status::Refunded
            | Status::Skipped => None,
        }
    }

    /// Adds a fact. Facts only accumulate; the first order.created and release reason
    /// stay.
    fn record(&mut self, fact: &Fact) -> Result<(), HandlerError> {
        match fact {
            Fact::Ordered(order) => {
                if self.amount_cents.is_none() {
                    if order.total_cents <= 0 {
                        return Err(HandlerError::permanent(anyhow!(
                            "order {} has a total of {} cents: nothing to pay",
                            order.order_id,
                            order.total_cents
                        )));
                    }
                    self.customer_id = Some(order.customer_id);
                    self.amount_cents = Some(order.total_cents);
                    self.currency = Some(order.currency.clone());
                    self.payment_method = Some(order.payment_method.clone());
                }
            }
            Fact::Reserved => self.reserved = true,
            Fact::Rejected => self.rejected = true,
            Fact::Released(reason) => {
                self.released.get_or_insert_with(|| reason.clone());
            }
            Fact::Cancelled => self.cancelled = true,
        }
        Ok(())
    }
}

type Row = (
    Uuid,
    Uuid,
    String,
    Option<Uuid>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    bool,
    Option<String>,
    bool,
);

macro_rules! columns {
    () => {
        "order_id, payment_id, status, customer_id, amount_cents, currency, payment_method, \
         provider, intent_id, failure_code, reserved, rejected, released, cancelled"
    };
}

fn from_row(row: Row) -> Result<Payment, HandlerError> {
    let (
        order_id,
        payment_id,
        status,
        customer_id,
        amount_cents,
        currency,
        payment_method,
        provider,
        intent_id,
        failure_code,
        reserved,
        rejected,
        released,
        cancelled,
    ) = row;
    Ok(Payment {
        order_id,
        payment_id,
        status: Status::parse(&status)?,
        customer_id,
        amount_cents,
        currency,
        payment_method,
        provider,
        intent_id,
        failure_code,
        reserved,
        rejected,
        released,
        cancelled,
    })
}

/// One order's payment, if any event of it was seen.
pub async fn find(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<Payment>, HandlerError> {
    let row: Option<Row> = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM payments WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(conn)
    .await?;
    row.map(from_row).transpose()
}

/// The order's row, created if this is its first event, locked until the transaction
/// ends: events of one order are decided one at a time, on every replica.
async fn lock(conn: &mut PgConnection, order_id: Uuid) -> Result<Payment, HandlerError> {
    sqlx::query(
        "INSERT INTO payments (order_id, payment_id, status) VALUES ($1, $2, 'pending') \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(Uuid::now_v7())
    .execute(&mut *conn)
    .await?;
    let row: Row = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM payments WHERE order_id = $1 FOR UPDATE"
    ))
    .bind(order_id)
    .fetch_one(&mut *conn)
    .await?;
    from_row(row)
}

async fn save(conn: &mut PgConnection, p: &Payment) -> Result<(), HandlerError> {
    sqlx::query(
        "UPDATE payments SET status = $2, customer_id = $3, amount_cents = $4, currency = $5, \
         payment_method = $6, provider = $7, intent_id = $8, failure_code = $9, \
         reserved = $10, rejected = $11, released = $12, cancelled = $13, updated_at = now() \
         WHERE order_id = $1",
    )
    .bind(p.order_id)
    .bind(p.status.as_str())
    .bind(p.customer_id)
    .bind(p.amount_cents)
    .bind(&p.currency)
    .bind(&p.payment_method)
    .bind(&p.provider)
    .bind(&p.intent_id)
    .bind(&p.failure_code)
    .bind(p.reserved)
    .bind(p.rejected)
    .bind(&p.released)
    .bind(p.cancelled)
    .execute(conn)
    .await?;
    Ok(())
}

/// The payment engine the event handlers share.
#[derive(Clone)]
pub struct Payments {
    pub provider: Arc<dyn PaymentProvider>,
    pub outbox: Outbox,
    /// For ledger rows of failed calls, written outside the transaction that rolls back.
    /// Records provider calls outside the handler's transaction; never the pool the
    /// handlers' transactions use.
    pub pool: PgPool,
    /// Bound of one provider call; past it the call counts as transient.
    pub timeout: Duration,
}

impl Payments {
    /// Records `fact` about `order_id` and takes every step it calls for, in `tx`.
    /// Gives the payment as it ends.
    pub async fn apply(
        &self,
        tx: &mut PgConnection,
        cause: &Envelope,
        order_id: Uuid,
        fact: Fact,
    ) -> Result<Payment, HandlerError> {
        let mut payment = lock(tx, order_id).await?;
        payment.record(&fact)?;
        while let Some(action) = payment.next_action() {
            tracing::info!(%order_id, fact = fact.name(), ?action, "payment step");
            self.step(tx, cause, &mut payment, action).await?;
        }
        save(tx, &payment).await?;
        Ok(payment)
    }

    async fn step(
        &self,
        tx: &mut PgConnection,
        cause: &Envelope,
        p: &mut Payment,
        action: Action,
    ) -> Result<(), HandlerError> {
        match action {
            Action::Skip => {
                self.void_orphaned_hold(tx, p).await?;
                p.status = Status::Skipped;
            }
            Action::Abandon => {
                self.void_orphaned_hold(tx, p).await?;
                p.status = Status::Voided;
                let voided = PaymentVoided {
                    order_id: p.order_id,
                    payment_id: p.payment_id,
                };
                self.publish(tx, cause, &voided).await?;
            }
            Action::Authorize => self.authorize(tx, cause, p).await?,
            Action::Capture => {
                let intent = intent_of(p)?;
                let entry = self.entry(p, Step::Capture);
                self.call(
                    tx,
                    entry,
                    self.provider.capture(&intent, &entry_key(p, Step::Capture)),
                )
                .await?;
                p.status = Status::Captured;
                let completed = PaymentCompleted {
                    order_id: p.order_id,
                    payment_id: p.payment_id,
                    amount_cents: p.amount_cents.unwrap_or_default(),
                    currency: p.currency.clone().unwrap_or_default(),
                };
                self.publish(tx, cause, &completed).await?;
            }
            Action::Void => {
                let intent = intent_of(p)?;
                let entry = self.entry(p, Step::Void);
                self.call(
                    tx,
                    entry,
                    self.provider.void(&intent, &entry_key(p, Step::Void)),
                )
                .await?;
                p.status = Status::Voided;
                let voided = PaymentVoided {
                    order_id: p.order_id,
                    payment_id: p.payment_id,
                };
                self.publish(tx, cause, &voided).await?;
            }
            Action::Refund => {
                let intent = intent_of(p)?;
                let amount = p.amount_cents.unwrap_or_default();
                let entry = self.entry(p, Step::Refund);
                let key = entry_key(p, Step::Refund);
                let refund = self.provider.refund(&intent, amount, &key);
                self.call(tx, entry, refund).await?;
                p.status = Status::Refunded;
                let refunded = PaymentRefunded {
                    order_id: p.order_id,
                    payment_id: p.payment_id,
                    amount_cents: amount,
                };
                self.publish(tx, cause, &refunded).await?;
            }
        }
        Ok(())
    }

    async fn authorize(
        &self,
        tx: &mut PgConnection,
        cause: &Envelope,
        p: &mut Payment,
    ) -> Result<(), HandlerError> {
        let request = AuthorizeRequest {
            order_id: p.order_id,
            amount_cents: p.amount_cents.unwrap_or_default(),
            currency: p.currency.clone().unwrap_or_default(),
            payment_method: p.payment_method.clone().unwrap_or_default(),
            idempotency_key: entry_key(p, Step::Authorize),
        };
        let mut entry = self.entry(p, Step::Authorize);
        let answer = timed(self.timeout, self.provider.authorize(&request)).await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => return Err(self.failed(entry, error)),
        };
        p.provider = Some(self.provider.name().to_owned());
        match answer {
            Authorization::Authorized { intent_id } => {
                entry.intent_id = Some(intent_id.clone());
                // Recorded outside `tx`: if this transaction rolls back (a capture right
                // after failing), the hold still exists at the provider, and a release
                // handled before the retry must find it to void it.
                ledger::insert_with(&self.pool, &entry.result("ok", None)).await?;
                p.intent_id = Some(intent_id);
                p.status = Status::Authorized;
                let authorized = PaymentAuthorized {
                    order_id: p.order_id,
                    payment_id: p.payment_id,
                    amount_cents: request.amount_cents,
                    currency: request.currency,
                };
                self.publish(tx, cause, &authorized).await?;
            }
            Authorization::Declined {
                code,
                message,
                intent_id,
            } => {
                entry.intent_id.clone_from(&intent_id);
                let detail = format!("{code}: {message}");
                ledger::insert(tx, &entry.result("declined", Some(detail))).await?;
                p.intent_id = intent_id;
                p.failure_code = Some(code.clone());
                p.status = Status::Failed;
                let failed = PaymentFailed {
                    order_id: p.order_id,
                    reason: code,
                };
                self.publish(tx, cause, &failed).await?;
            }
        }
        Ok(())
    }

    /// Voids a hold an earlier, rolled-back attempt left at the provider, if the ledger
    /// shows one: the payment is about to end without ever holding money.
    async fn void_orphaned_hold(
        &self,
        tx: &mut PgConnection,
        p: &mut Payment,
    ) -> Result<(), HandlerError> {
        let Some(intent) = ledger::authorized_intent(tx, p.order_id).await? else {
            return Ok(());
        };
        tracing::warn!(order_id = %p.order_id, %intent, "voiding a hold left by a rolled-back attempt");
        p.intent_id = Some(intent.clone());
        p.provider = Some(self.provider.name().to_owned());
        let entry = self.entry(p, Step::Void);
        self.call(
            tx,
            entry,
            self.provider.void(&intent, &entry_key(p, Step::Void)),
        )
        .await?;
        Ok(())
    }

    /// Runs a call within the time bound and records it: in `tx` when it succeeded
    /// (it stands or falls with the state change), outside it when it failed (the
    /// transaction rolls back, the attempt still happened).
    async fn call<T>(
        &self,
        tx: &mut PgConnection,
        entry: Entry,
        call: impl Future<Output = Result<T, ProviderError>> + Send,
    ) -> Result<T, HandlerError> {
        match timed(self.timeout, call).await {
            Ok(value) => {
                ledger::insert(tx, &entry.result("ok", None)).await?;
                Ok(value)
            }
            Err(error) => Err(self.failed(entry, error)),
        }
    }

    fn failed(&self, entry: Entry, error: ProviderError) -> HandlerError {
        let (result, handler_error) = match error {
            ProviderError::Transient(e) => ("transient", HandlerError::transient(e)),
            ProviderError::Rejected(e) => ("rejected", HandlerError::permanent(e)),
        };
        metrics::counter!("payment_provider_failures_total", "step" => entry.step.clone(), "result" => result)
            .increment(1);
        let entry = entry.result(result, Some(format!("{:#}", handler_error.error)));
        let pool = self.pool.clone();
        tokio::spawn(async move {
            if let Err(error) = ledger::insert_with(&pool, &entry).await {
                tracing::warn!(%error, order_id = ?entry.order_id, "could not record a failed provider call");
            }
        });
        handler_error
    }

    fn entry(&self, p: &Payment, step: Step) -> Entry {
        Entry::call(
            p.order_id,
            step,
            entry_key(p, step),
            self.provider.name(),
            p.intent_id.clone(),
            p.amount_cents,
            p.currency.clone(),
        )
    }

    async fn publish<E: Event>(
        &self,
        tx: &mut PgConnection,
        cause: &Envelope,
        event: &E,
    ) -> Result<(), HandlerError> {
        self.outbox
            .enqueue(tx, event.to_new(cause.correlation_id).caused_by(cause))
            .await?;
        Ok(())
    }
}

fn entry_key(p: &Payment, step: Step) -> String {
    step.idempotency_key(p.order_id)
}

fn intent_of(p: &Payment) -> Result<String, HandlerError> {
    p.intent_id.clone().ok_or_else(|| {
        HandlerError::permanent(anyhow!(
            "payment of order {} is {} without a payment intent",
            p.order_id,
            p.status.as_str()
        ))
    })
}

async fn timed<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::Transient(anyhow!(
                "the payment provider did not answer within {timeout:?}"
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment() -> Payment {
        Payment {
            order_id: Uuid::now_v7(),
            payment_id: Uuid::now_v7(),
            status: Status::Pending,
            customer_id: None,
            amount_cents: None,
            currency: None,
            payment_method: None,
            provider: None,
            intent_id: None,
            failure_code: None,
            reserved: false,
            rejected: false,
            released: None,
            cancelled: false,
        }
    }

    fn ordered(p: &Payment) -> Fact {
        Fact::Ordered(OrderCreated {
            order_id: p.order_id,
            customer_id: Uuid::now_v7(),
            lines: vec![],
            total_cents: 2500,
            currency: "EUR".into(),
            payment_method: "pm_card_visa".into(),
            created_at: chrono::Utc::now(),
        })
    }

    /// Plays the facts in order with a provider that always says yes; gives the actions.
    fn play(facts: &[Fact], start: &Payment) -> (Payment, Vec<Action>) {
        let mut p = start.clone();
        let mut actions = Vec::new();
        for fact in facts {
            p.record(fact).expect("valid fact");
            while let Some(action) = p.next_action() {
                actions.push(action);
                p.status = match action {
                    Action::Authorize => {
                        p.intent_id = Some("pi_1".into());
                        Status::Authorized
                    }
                    Action::Capture => Status::Captured,
                    Action::Void | Action::Abandon => Status::Voided,
                    Action::Refund => Status::Refunded,
                    Action::Skip => Status::Skipped,
                };
            }
        }
        (p, actions)
    }

    fn permutations(facts: &[Fact]) -> Vec<Vec<Fact>> {
        if facts.len() <= 1 {
            return vec![facts.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..facts.len() {
            let mut rest = facts.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first.clone());
                all.push(tail);
            }
        }
        all
    }

    #[test]
    fn reserved_and_ordered_capture_once_in_any_order() {
        let start = payment();
        for facts in permutations(&[ordered(&start), Fact::Reserved, Fact::Reserved]) {
            let (p, actions) = play(&facts, &start);
            assert_eq!(p.status, Status::Captured);
            assert_eq!(actions, vec![Action::Authorize, Action::Capture]);
        }
    }

    #[test]
    fn rejection_never_captures_and_refunds_only_a_capture() {
        let start = payment();
        let (p, actions) = play(&[ordered(&start), Fact::Rejected], &start);
        assert_eq!(
            (p.status, actions),
            (Status::Voided, vec![Action::Authorize, Action::Void])
        );
        let (p, actions) = play(&[Fact::Rejected, ordered(&start)], &start);
        assert_eq!((p.status, actions), (Status::Skipped, vec![Action::Skip]));
        let (p, actions) = play(&[ordered(&start), Fact::Reserved, Fact::Rejected], &start);
        assert_eq!(
            (p.status, actions),
            (
                Status::Refunded,
                vec![Action::Authorize, Action::Capture, Action::Refund]
            )
        );
    }

    #[test]
    fn an_expiry_release_voids_a_hold_but_not_a_capture() {
        let start = payment();
        let expired = Fact::Released("expired".into());
        let (p, _) = play(&[ordered(&start), Fact::Reserved, expired.clone()], &start);
        assert_eq!(p.status, Status::Captured, "inventory re-takes or rejects");
        for facts in permutations(&[ordered(&start), expired.clone()]) {
            let (p, _) = play(&facts, &start);
            assert_eq!(p.status, Status::Voided, "{facts:?}");
        }
        // Reserved then released before the authorization: the release wins.
        for facts in permutations(&[ordered(&start), Fact::Reserved, expired]) {
            let (p, actions) = play(&facts, &start);
            if p.status == Status::Captured {
                // Only when the capture happened before the release arrived.
                assert_eq!(actions, vec![Action::Authorize, Action::Capture]);
            } else {
                assert_eq!(p.status, Status::Voided, "{facts:?}");
                assert!(!actions.contains(&Action::Capture));
            }
        }
    }

    #[test]
    fn cancel_voids_or_refunds_and_terminal_states_absorb() {
        let start = payment();
        let (p, _) = play(&[ordered(&start), Fact::Cancelled], &start);
        assert_eq!(p.status, Status::Voided);
        let (p, _) = play(&[ordered(&start), Fact::Reserved, Fact::Cancelled], &start);
        assert_eq!(p.status, Status::Refunded);
        let (p, actions) = play(
            &[
                ordered(&start),
                Fact::Reserved,
                Fact::Cancelled,
                Fact::Rejected,
                Fact::Released("cancelled".into()),
            ],
            &start,
        );
        assert_eq!(p.status, Status::Refunded);
        assert_eq!(actions.iter().filter(|a| **a == Action::Refund).count(), 1);
        let mut failed = start.clone();
        failed.record(&ordered(&start)).expect("fact");
        failed.status = Status::Failed;
        let (p, actions) = play(&[Fact::Reserved, Fact::Cancelled], &failed);
        assert_eq!((p.status, actions), (Status::Failed, vec![]));
    }
}

//! The ledger: every call to the payment provider (failed attempts included) and every
//! verified webhook event, for reconciliation with the provider's own records.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::provider::Step;

#[derive(Clone, Debug)]
pub struct Entry {
    pub order_id: Option<Uuid>,
    pub source: &'static str,
    pub step: String,
    pub idempotency_key: Option<String>,
    pub provider: &'static str,
    pub intent_id: Option<String>,
    pub result: String,
    pub detail: Option<String>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub provider_event_id: Option<String>,
}

impl Entry {
    pub fn call(
        order_id: Uuid,
        step: Step,
        idempotency_key: String,
        provider: &'static str,
        intent_id: Option<String>,
        amount_cents: Option<i64>,
        currency: Option<String>,
    ) -> Self {
        Self {
            order_id: Some(order_id),
            source: "call",
            step: step.as_str().to_owned(),
            idempotency_key: Some(idempotency_key),
            provider,
            intent_id,
            result: String::new(),
            detail: None,
            amount_cents,
            currency,
            provider_event_id: None,
        }
    }

    pub fn result(mut self, result: &str, detail: Option<String>) -> Self {
        result.clone_into(&mut self.result);
        self.detail = detail;
        self
    }
}

const INSERT: &str = "INSERT INTO payment_ledger (id, order_id, source, step, idempotency_key, \
     provider, intent_id, result, detail, amount_cents, currency, provider_event_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
     ON CONFLICT (provider_event_id) DO NOTHING";

macro_rules! bind_entry {
    ($entry:expr) => {
        sqlx::query(INSERT)
            .bind(Uuid::now_v7())
            .bind($entry.order_id)
            .bind($entry.source)
            .bind(&$entry.step)
            .bind(&$entry.idempotency_key)
            .bind($entry.provider)
            .bind(&$entry.intent_id)
            .bind(&$entry.result)
            .bind(&$entry.detail)
            .bind($entry.amount_cents)
            .bind(&$entry.currency)
            .bind(&$entry.provider_event_id)
    };
}

/// Records `entry` in the caller's transaction; false if it was already there (a
/// redelivered webhook event).
pub async fn insert(conn: &mut PgConnection, entry: &Entry) -> Result<bool, sqlx::Error> {
    metrics::counter!("payment_ledger_entries_total", "step" => entry.step.clone(), "result" => entry.result.clone())
        .increment(1);
    Ok(bind_entry!(entry).execute(conn).await?.rows_affected() == 1)
}

/// Records `entry` on its own, outside any transaction.
pub async fn insert_with(pool: &PgPool, entry: &Entry) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    insert(&mut conn, entry).await
}

/// One ledger row as the API shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct LedgerView {
    pub source: String,
    pub step: String,
    pub idempotency_key: Option<String>,
    pub provider: String,
    pub intent_id: Option<String>,
    pub result: String,
    pub detail: Option<String>,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub provider_event_id: Option<String>,
    pub at: DateTime<Utc>,
}

type Row = (
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
);

/// The order's ledger, oldest first.
pub async fn of_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<LedgerView>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT source, step, idempotency_key, provider, intent_id, result, detail, \
         amount_cents, currency, provider_event_id, at FROM payment_ledger \
         WHERE order_id = $1 ORDER BY at, id",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                source,
                step,
                idempotency_key,
                provider,
                intent_id,
                result,
                detail,
                amount_cents,
                currency,
                provider_event_id,
                at,
            )| LedgerView {
                source,
                step,
                idempotency_key,
                provider,
                intent_id,
                result,
                detail,
                amount_cents,
                currency,
                provider_event_id,
                at,
            },
        )
        .collect())
}

/// The intent of a successful authorization recorded for `order_id`, if any.
pub async fn authorized_intent(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT intent_id FROM payment_ledger \
         WHERE order_id = $1 AND source = 'call' AND step = 'authorize' AND result = 'ok' \
           AND intent_id IS NOT NULL \
         ORDER BY at DESC LIMIT 1",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

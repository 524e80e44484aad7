//! Dead letters are for people. Each service moves its dead-letter queue into its own
//! `dead_letters` table (acknowledging only after the row is stored) and offers list
//! (grouped by error fingerprint), show, replay and discard.
//!
//! Replay goes through the outbox to the failed service's own queue, not back to the
//! topic exchange: the other subscribers of that event already handled it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Digest as _;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::consumer::body_id;
use super::outbox::{self, Backoff, OutboxMessage, pause};
use super::{Broker, Topology, headers};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Status {
    Open,
    Replayed,
    Discarded,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Self::Open),
            "replayed" => Some(Self::Replayed),
            "discarded" => Some(Self::Discarded),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Replayed => "replayed",
            Self::Discarded => "discarded",
        }
    }
}

/// Dead letters that failed the same way.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Group {
    pub fingerprint: String,
    pub service: String,
    pub handler: String,
    pub error_kind: String,
    /// The error of the most recent member.
    pub error_message: String,
    pub count: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub event_types: Vec<String>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: Uuid,
    pub message_id: String,
    pub event_type: Option<String>,
    pub correlation_id: Option<String>,
    pub service: String,
    pub handler: String,
    pub error_kind: String,
    pub error_message: String,
    pub error_chain: String,
    pub fingerprint: String,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub headers: Value,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub status: Status,
    pub dead_lettered_count: i32,
    pub replay_count: i32,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replayed_by: Option<String>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discarded_by: Option<String>,
}

impl DeadLetter {
    /// The body for people: pretty JSON when it is JSON, else the text as it came.
    pub fn body_pretty(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// Replaces the parts of an error message that differ between occurrences of the same
/// fault (ids, numbers, times) so those occurrences group together.
pub fn normalise(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            out.push_str("<*>");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in message.chars() {
        if c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

pub fn fingerprint(service: &str, handler: &str, kind: &str, message: &str) -> String {
    let mut hasher = sha2::Sha256::new();
    for part in [service, handler, kind, &normalise(message)] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    crate::hex(&hasher.finalize()[..8])
}

const COLUMNS: &str = "id, message_id, event_type, correlation_id, service, handler, error_kind, \
    error_message, error_chain, fingerprint, attempts, first_failed_at, last_failed_at, \
    original_exchange, original_routing_key, headers, body, status, dead_lettered_count, \
    replay_count, received_at, updated_at, replayed_at, replayed_by, discarded_at, discarded_by";

/// The filter of [`Filter`]: `$1` status, `$2` fingerprint, `$3` event type, `$4` since,
/// `$5` until, `$6` text as an ILIKE pattern, `$7` text as bytes.
const WHERE: &str = "($1::text IS NULL OR status = $1) \
    AND ($2::text IS NULL OR fingerprint = $2) \
    AND ($3::text IS NULL OR event_type = $3) \
    AND ($4::timestamptz IS NULL OR last_failed_at >= $4) \
    AND ($5::timestamptz IS NULL OR last_failed_at < $5) \
    AND ($6::text IS NULL OR error_message ILIKE $6 OR error_chain ILIKE $6 \
         OR message_id ILIKE $6 OR coalesce(correlation_id, '') ILIKE $6 \
         OR position($7::bytea in body) > 0)";

/// What to list. Every field narrows the selection; `None` does not filter.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub status: Option<Status>,
    pub fingerprint: Option<String>,
    pub event_type: Option<String>,
    /// Last failure at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Last failure before this time.
    pub until: Option<DateTime<Utc>>,
    /// Found in the error message or chain, the message or correlation id (any case), or
    /// the body (exact case).
    pub text: Option<String>,
    /// Keyset paging: only dead letters after this one in list order, given as its last
    /// failure time and its key (`<service>:<id>`, see [`DeadLetterStore::key`]).
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: Option<i64>,
}

/// What a replay is asked for.
#[derive(Clone, Debug)]
pub enum Selection {
    Ids(Vec<Uuid>),
    /// Every open member of the group at the moment of asking.
    Group(String),
}

/// What came of a replay request.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayOutcome {
    pub audit_id: Uuid,
    /// The dead letters asked for (for a group: its open members when asked).
    pub requested: Vec<Uuid>,
    /// Those that were open and are now queued for replay.
    pub replayed: Vec<Uuid>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    Discarded,
    AlreadyDiscarded,
    /// It was replayed; a replay that fails again reopens it.
    Replayed,
    NotFound,
}

/// One replay or discard, as the audit log keeps it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub operator: String,
    pub action: String,
    pub fingerprint: Option<String>,
    pub requested: Vec<Uuid>,
    pub affected: Vec<Uuid>,
}

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub operator: Option<String>,
    pub action: Option<String>,
    /// Keyset paging: entries after this one (time, key), newest first.
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Queued {
    seq: i64,
    operator: String,
    #[sqlx(flatten)]
    letter: DeadLetter,
}

/// `%text%` for ILIKE, with the pattern characters in `text` taken literally.
fn like_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

type PgQueryAs<'q, O> = sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// Binds `$1`…`$7` of [`WHERE`].
fn bind_filter<'q, O>(query: PgQueryAs<'q, O>, filter: &Filter) -> PgQueryAs<'q, O> {
    let text = filter
        .text
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    query
        .bind(filter.status)
        .bind(filter.fingerprint.clone())
        .bind(filter.event_type.clone())
        .bind(filter.since)
        .bind(filter.until)
        .bind(text.map(like_pattern))
        .bind(text.map(|t| t.as_bytes().to_vec()))
}

#[derive(Clone, Debug)]
pub struct DeadLetterStore {
    pool: PgPool,
    topology: Topology,
    /// Wakes this process's replayer when a replay was asked for here.
    replays_queued: Arc<Notify>,
}

impl DeadLetterStore {
    pub fn new(pool: PgPool, topology: Topology) -> Self {
        Self {
            pool,
            topology,
            replays_queued: Arc::new(Notify::new()),
        }
    }

    /// The service whose dead letters these are (short name).
    pub fn service(&self) -> &str {
        self.topology.service()
    }

    /// The id of a dead letter across the whole system: `<service>:<uuid>`, so that the
    /// gateway knows which service owns it.
    pub fn key(&self, id: Uuid) -> String {
        format!("{}:{id}", self.service())
    }

    /// Stores one message from the dead-letter queue. A redelivery of the same failure
    /// changes nothing; a new failure of a replayed message reopens its row.
    pub async fn ingest(&self, delivery: &Delivery) -> Result<(), sqlx::Error> {
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let record = Record::from_delivery(delivery, &table, self.topology.service());
        let fingerprint = fingerprint(
            &record.service,
            &record.handler,
            &record.error_kind,
            &record.error_message,
        );
        sqlx::query(
            "INSERT INTO dead_letters (id, message_id, event_type, correlation_id, service, \
             handler, error_kind, error_message, error_chain, fingerprint, attempts, \
             first_failed_at, last_failed_at, original_exchange, original_routing_key, headers, \
             body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16, $17) \
             ON CONFLICT (message_id) DO UPDATE SET \
               handler = EXCLUDED.handler, error_kind = EXCLUDED.error_kind, \
               error_message = EXCLUDED.error_message, error_chain = EXCLUDED.error_chain, \
               fingerprint = EXCLUDED.fingerprint, attempts = EXCLUDED.attempts, \
               first_failed_at = EXCLUDED.first_failed_at, \
               last_failed_at = EXCLUDED.last_failed_at, headers = EXCLUDED.headers, \
               body = EXCLUDED.body, status = 'open', \
               dead_lettered_count = dead_letters.dead_lettered_count + 1, updated_at = now() \
             WHERE dead_letters.last_failed_at < EXCLUDED.last_failed_at",
        )
        .bind(Uuid::now_v7())
        .bind(&record.message_id)
        .bind(&record.event_type)
        .bind(&record.correlation_id)
        .bind(&record.service)
        .bind(&record.handler)
        .bind(&record.error_kind)
        .bind(&record.error_message)
        .bind(&record.error_chain)
        .bind(&fingerprint)
        .bind(record.attempts)
        .bind(record.first_failed_at)
        .bind(record.last_failed_at)
        .bind(&record.original_exchange)
        .bind(&record.original_routing_key)
        .bind(headers::to_json(&table))
        .bind(&delivery.data)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Open dead letters grouped by fingerprint, largest group first.
    pub async fn groups(&self) -> Result<Vec<Group>, sqlx::Error> {
        self.groups_matching(&Filter {
            status: Some(Status::Open),
            ..Filter::default()
        })
        .await
    }

    /// Dead letters matching `filter` (paging fields aside) grouped by fingerprint,
    /// largest group first.
    pub async fn groups_matching(&self, filter: &Filter) -> Result<Vec<Group>, sqlx::Error> {
        let sql = format!(
            "SELECT fingerprint, service, handler, error_kind, \
               (array_agg(error_message ORDER BY last_failed_at DESC))[1] AS error_message, \
               count(*) AS count, min(first_failed_at) AS first_seen, \
               max(last_failed_at) AS last_seen, \
               array_agg(DISTINCT coalesce(event_type, '-')) AS event_types \
             FROM dead_letters WHERE {WHERE} \
             GROUP BY fingerprint, service, handler, error_kind \
             ORDER BY count(*) DESC, max(last_failed_at) DESC, fingerprint LIMIT 1000"
        );
        let query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        bind_filter(query, filter).fetch_all(&self.pool).await
    }

    /// Dead letters matching `filter`, most recent failure first.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE {WHERE} \
               AND ($8::timestamptz IS NULL \
                    OR (last_failed_at, $9 || id::text) < ($8, $10)) \
             ORDER BY last_failed_at DESC, id DESC LIMIT $11"
        );
        let query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        bind_filter(query, filter)
            .bind(filter.after.as_ref().map(|(at, _)| *at))
            .bind(format!("{}:", self.service()))
            .bind(filter.after.as_ref().map(|(_, key)| key.clone()))
            .bind(filter.limit.unwrap_or(100).clamp(1, 1000))
            .fetch_all(&self.pool)
            .await
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<DeadLetter>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// True while a replay of `id` waits for its turn to be sent.
    pub async fn replay_pending(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM dead_letter_replays WHERE dead_letter_id = $1)",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
    }

    /// Marks the open dead letters of `selection` replayed and queues them, in one
    /// transaction, with an audit entry. The set is fixed here: dead letters arriving
    /// later are not part of it. The replayer ([`run_replayer`](Self::run_replayer))
    /// then sends them at its configured rate.
    pub async fn request_replay(
        &self,
        selection: &Selection,
        operator: &str,
    ) -> Result<ReplayOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let outcome = self.queue_replay(&mut tx, selection, operator).await?;
        tx.commit().await?;
        if !outcome.replayed.is_empty() {
            self.replays_queued.notify_one();
        }
        Ok(outcome)
    }

    async fn queue_replay(
        &self,
        conn: &mut PgConnection,
        selection: &Selection,
        operator: &str,
    ) -> Result<ReplayOutcome, sqlx::Error> {
        let (requested, fingerprint) = match selection {
            Selection::Ids(ids) => (ids.clone(), None),
            Selection::Group(fingerprint) => {
                let ids = sqlx::query_scalar(
                    "SELECT id FROM dead_letters WHERE fingerprint = $1 AND status = 'open' \
                     ORDER BY first_failed_at, id",
                )
                .bind(fingerprint)
                .fetch_all(&mut *conn)
                .await?;
                (ids, Some(fingerprint.clone()))
            }
        };
        let replayed: Vec<Uuid> = sqlx::query_scalar(
            "WITH chosen AS ( \
               SELECT id FROM dead_letters WHERE id = ANY($1) AND status = 'open' \
               ORDER BY first_failed_at, id FOR UPDATE) \
             UPDATE dead_letters d SET status = 'replayed', \
               replay_count = d.replay_count + 1, replayed_at = now(), replayed_by = $2, \
               updated_at = now() \
             FROM chosen WHERE d.id = chosen.id RETURNING d.id",
        )
        .bind(&requested)
        .bind(operator)
        .fetch_all(&mut *conn)
        .await?;
        // Queued in the order they first failed, so a replay keeps the original order.
        sqlx::query(
            "INSERT INTO dead_letter_replays (dead_letter_id, operator) \
             SELECT d.id, $2 FROM dead_letters d WHERE d.id = ANY($1) \
             ORDER BY d.first_failed_at, d.id \
             ON CONFLICT (dead_letter_id) DO NOTHING",
        )
        .bind(&replayed)
        .bind(operator)
        .execute(&mut *conn)
        .await?;
        let audit_id = self
            .audit_entry(conn, operator, "replay", fingerprint, &requested, &replayed)
            .await?;
        Ok(ReplayOutcome {
            audit_id,
            requested,
            replayed,
        })
    }

    async fn audit_entry(
        &self,
        conn: &mut PgConnection,
        operator: &str,
        action: &str,
        fingerprint: Option<String>,
        requested: &[Uuid],
        affected: &[Uuid],
    ) -> Result<Uuid, sqlx::Error> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO dead_letter_audit (id, operator, action, fingerprint, requested, \
             affected) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(operator)
        .bind(action)
        .bind(fingerprint)
        .bind(requested)
        .bind(affected)
        .execute(conn)
        .await?;
        Ok(id)
    }

    /// Hands up to `limit` queued replays to the outbox, oldest request first; returns
    /// how many. Replicas share the queue (`SKIP LOCKED`).
    pub async fn send_queued(&self, limit: i64) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let sent = self.drain(&mut tx, None, limit).await?;
        tx.commit().await?;
        Ok(sent)
    }

    /// Moves queued replays (all, or only those of `only`) into the outbox, addressed to
    /// this service's own queue, without the failure headers and with the replay count
    /// and operator set.
    async fn drain(
        &self,
        conn: &mut PgConnection,
        only: Option<&[Uuid]>,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "SELECT q.seq, q.operator, {COLUMNS} FROM dead_letter_replays q \
             JOIN dead_letters d ON d.id = q.dead_letter_id \
             WHERE ($1::uuid[] IS NULL OR q.dead_letter_id = ANY($1)) \
             ORDER BY q.seq LIMIT $2 FOR UPDATE OF q SKIP LOCKED"
        );
        let rows: Vec<Queued> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(only)
            .bind(limit.max(1))
            .fetch_all(&mut *conn)
            .await?;
        for row in &rows {
            let message = self.replay_message(&row.letter, &row.operator);
            outbox::insert(&mut *conn, &message).await?;
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        sqlx::query("DELETE FROM dead_letter_replays WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&mut *conn)
            .await?;
        let sent = rows.len() as u64;
        if sent > 0 {
            metrics::counter!("dead_letters_replayed_total", "service" => self.service().to_owned())
                .increment(sent);
        }
        Ok(sent)
    }

    fn replay_message(&self, row: &DeadLetter, operator: &str) -> OutboxMessage {
        let mut headers = match &row.headers {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
        };
        for key in headers::FAILURE_HEADERS {
            headers.remove(key);
        }
        headers.remove("x-delivery-count");
        headers.insert(
            headers::ORIGINAL_EXCHANGE.into(),
            row.original_exchange.clone().into(),
        );
        headers.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            row.original_routing_key.clone().into(),
        );
        // The row's count was raised when the replay was asked for.
        headers.insert(headers::REPLAY_COUNT.into(), row.replay_count.into());
        headers.insert(headers::REPLAYED_BY.into(), operator.into());
        let message_id = Uuid::parse_str(&row.message_id).unwrap_or_else(|_| Uuid::now_v7());
        OutboxMessage {
            message_id,
            exchange: String::new(),
            routing_key: self.topology.queue(),
            event_type: row.event_type.clone().unwrap_or_default(),
            correlation_id: row.correlation_id.clone(),
            headers,
            body: row.body.clone(),
        }
    }

    /// Sends the open dead letters among `ids` back to this service's queue at once
    /// (through the outbox, unpaced) and marks them replayed. Returns how many.
    pub async fn replay(&self, ids: &[Uuid], operator: &str) -> Result<u64, sqlx::Error> {
        self.replay_now(&Selection::Ids(ids.to_vec()), operator)
            .await
    }

    /// Replays a whole group as it stands now, unpaced; members arriving later are not
    /// included.
    pub async fn replay_group(
        &self,
        fingerprint: &str,
        operator: &str,
    ) -> Result<u64, sqlx::Error> {
        self.replay_now(&Selection::Group(fingerprint.to_owned()), operator)
            .await
    }

    async fn replay_now(&self, selection: &Selection, operator: &str) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let outcome = self.queue_replay(&mut tx, selection, operator).await?;
        let count = i64::try_from(outcome.replayed.len()).unwrap_or(i64::MAX);
        self.drain(&mut tx, Some(&outcome.replayed), count).await?;
        tx.commit().await?;
        Ok(outcome.replayed.len() as u64)
    }

    /// Marks an open dead letter discarded; false if there was none open with that id.
    pub async fn discard(&self, id: Uuid, operator: &str) -> Result<bool, sqlx::Error> {
        Ok(self.discard_one(id, operator).await? == Discard::Discarded)
    }

    /// Marks an open dead letter discarded, with an audit entry. It is kept (shown as
    /// discarded) until [`purge_discarded`](Self::purge_discarded) removes it.
    pub async fn discard_one(&self, id: Uuid, operator: &str) -> Result<Discard, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let status: Option<Status> =
            sqlx::query_scalar("SELECT status FROM dead_letters WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let outcome = match status {
            None => Discard::NotFound,
            Some(Status::Discarded) => Discard::AlreadyDiscarded,
            Some(Status::Replayed) => Discard::Replayed,
            Some(Status::Open) => {
                sqlx::query(
                    "UPDATE dead_letters SET status = 'discarded', discarded_at = now(), \
                     discarded_by = $2, updated_at = now() WHERE id = $1",
                )
                .bind(id)
                .bind(operator)
                .execute(&mut *tx)
                .await?;
                self.audit_entry(&mut tx, operator, "discard", None, &[id], &[id])
                    .await?;
                Discard::Discarded
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Deletes dead letters discarded longer than `retention` ago; returns how many.
    pub async fn purge_discarded(&self, retention: Duration) -> Result<u64, sqlx::Error> {
        let seconds = retention.as_secs_f64();
        let purged = sqlx::query(
            "DELETE FROM dead_letters WHERE status = 'discarded' \
             AND discarded_at < now() - make_interval(secs => $1)",
        )
        .bind(seconds)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(purged)
    }

    /// The audit log, newest first.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, at, operator, action, fingerprint, requested, affected \
             FROM dead_letter_audit \
             WHERE ($1::text IS NULL OR operator = $1) \
               AND ($2::text IS NULL OR action = $2) \
               AND ($3::timestamptz IS NULL OR (at, $4 || id::text) < ($3, $5)) \
             ORDER BY at DESC, id DESC LIMIT $6",
        )
        .bind(&filter.operator)
        .bind(&filter.action)
        .bind(filter.after.as_ref().map(|(at, _)| *at))
        .bind(format!("{}:", self.service()))
        .bind(filter.after.as_ref().map(|(_, key)| key.clone()))
        .bind(filter.limit.unwrap_or(50).clamp(1, 1000))
        .fetch_all(&self.pool)
        .await
    }

    /// Sends queued replays at `rate_per_sec` at most, until `shutdown`. Wakes when a
    /// replay is asked for through this store, and every `poll` for those asked through
    /// another replica.
    pub async fn run_replayer(
        self: Arc<Self>,
        rate_per_sec: f64,
        poll: Duration,
        shutdown: CancellationToken,
    ) {
        let rate = rate_per_sec.max(0.1);
        // A tenth of a second's worth at a time keeps the pace even.
        let burst = (rate / 10.0).ceil().max(1.0);
        let mut tokens = burst;
        let mut last = tokio::time::Instant::now();
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() {
            let now = tokio::time::Instant::now();
            tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst);
            last = now;
            if tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - tokens) / rate);
                if pause(wait, &shutdown).await {
                    break;
                }
                continue;
            }
            match self.send_queued(tokens.floor() as i64).await {
                Ok(0) => {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = self.replays_queued.notified() => {}
                        () = tokio::time::sleep(poll) => {}
                    }
                }
                Ok(sent) => {
                    backoff = Backoff::new();
                    tokens -= sent as f64;
                }
                Err(error) => {
                    tracing::warn!(%error, "could not send queued replays; trying again");
                    if pause(backoff.next_delay(), &shutdown).await {
                        break;
                    }
                }
            }
        }
    }

    /// Purges discarded dead letters older than `retention`, now and then every `every`,
    /// until `shutdown`.
    pub async fn run_purger(
        self: Arc<Self>,
        retention: Duration,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            match self.purge_discarded(retention).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "purged discarded dead letters"),
                Err(error) => tracing::warn!(%error, "could not purge discarded dead letters"),
            }
            if pause(every, &shutdown).await {
                break;
            }
        }
    }

    /// Moves the dead-letter queue into the table until `shutdown`.
    pub async fn run_ingest(self: Arc<Self>, broker: Broker, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() {
            match self.ingest_session(&broker, &shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, queue = %self.topology.dead_letter_queue(), "dead-letter ingest stopped; restarting");
                    if pause(backoff.next_delay(), &shutdown).await {
                        break;
                    }
                }
            }
        }
    }

    async fn ingest_session(
        &self,
        broker: &Broker,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let channel = broker.channel().await?;
        self.topology.declare_dead_letter_queue(&channel).await?;
        channel.basic_qos(16, BasicQosOptions::default()).await?;
        let mut deliveries = channel
            .basic_consume(
                self.topology.dead_letter_queue().into(),
                format!("{}.ingest", self.topology.dead_letter_queue()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let result = loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                next = deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Err(error.into()),
                None => break Err(anyhow::anyhow!("the broker cancelled the ingest consumer")),
            };
            match self.ingest(&delivery).await {
                Ok(()) => {
                    metrics::counter!("dead_letters_stored_total", "service" => self.topology.service().to_owned()).increment(1);
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                }
                Err(error) => {
                    // Keep it on the queue; the database may be back soon.
                    tracing::error!(%error, "could not store a dead letter; it stays queued");
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await?;
                    if pause(Duration::from_secs(1), shutdown).await {
                        break Ok(());
                    }
                }
            }
        };
        let _ = channel.close(200, "ingest stopped".into()).await;
        result
    }
}

/// A dead letter's fields, from our headers or, for a message the broker dead-lettered
/// itself (delivery limit), from what the broker left.
struct Record {
    message_id: String,
    event_type: Option<String>,
    correlation_id: Option<String>,
    service: String,
    handler: String,
    error_kind: String,
    error_message: String,
    error_chain: String,
    attempts: i32,
    first_failed_at: DateTime<Utc>,
    last_failed_at: DateTime<Utc>,
    original_exchange: String,
    original_routing_key: String,
}

fn time(table: &FieldTable, key: &str) -> Option<DateTime<Utc>> {
    headers::get_str(table, key)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The first `x-death` entry: where the broker dead-lettered the message from.
fn first_death(table: &FieldTable) -> Option<FieldTable> {
    match table.inner().get("x-death")? {
        AMQPValue::FieldArray(entries) => match entries.as_slice().first()? {
            AMQPValue::FieldTable(entry) => Some(entry.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn first_routing_key(death: &FieldTable) -> Option<String> {
    match death.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => match keys.as_slice().first()? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

impl Record {
    fn from_delivery(delivery: &Delivery, table: &FieldTable, service: &str) -> Self {
        let props = &delivery.properties;
        let now = Utc::now();
        let death = first_death(table);
        let (error_kind, error_message) = if table.contains_key(headers::ERROR_KIND) {
            (
                headers::get_str(table, headers::ERROR_KIND).unwrap_or_default(),
                headers::get_str(table, headers::ERROR_MESSAGE).unwrap_or_default(),
            )
        } else {
            let reason = death
                .as_ref()
                .and_then(|d| headers::get_str(d, "reason"))
                .unwrap_or_else(|| "unknown".into());
            (
                "broker".to_owned(),
                format!(
                    "dead-lettered by the broker ({reason}); the consumer may have crashed on \
                     it repeatedly"
                ),
            )
        };
        Self {
            message_id: props
                .message_id()
                .as_ref()
                .map_or_else(|| body_id(&delivery.data), |id| id.as_str().to_owned()),
            event_type: props.kind().as_ref().map(|k| k.as_str().to_owned()),
            correlation_id: props
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            service: headers::get_str(table, headers::SERVICE).unwrap_or_else(|| service.into()),
            handler: headers::get_str(table, headers::HANDLER).unwrap_or_else(|| "-".into()),
            error_chain: headers::get_str(table, headers::ERROR_CHAIN)
                .unwrap_or_else(|| error_message.clone()),
            error_kind,
            error_message,
            attempts: headers::get_i64(table, headers::ATTEMPTS)
                .or_else(|| headers::get_i64(table, "x-delivery-count"))
                .and_then(|a| i32::try_from(a).ok())
                .unwrap_or(1),
            first_failed_at: time(table, headers::FIRST_FAILURE_AT).unwrap_or(now),
            last_failed_at: time(table, headers::LAST_FAILURE_AT).unwrap_or(now),
            original_exchange: headers::get_str(table, headers::ORIGINAL_EXCHANGE)
                .or_else(|| death.as_ref().and_then(|d| headers::get_str(d, "exchange")))
                .unwrap_or_else(|| delivery.exchange.to_string()),
            original_routing_key: headers::get_str(table, headers::ORIGINAL_ROUTING_KEY)
                .or_else(|| death.as_ref().and_then(first_routing_key))
                .unwrap_or_else(|| delivery.routing_key.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrences_of_one_fault_share_a_fingerprint() {
        let a = fingerprint(
            "notification",
            "send_receipt",
            "permanent",
            "template receipt missing for order 0192f1c2-aaaa-7bbb-8ccc-123456789abc",
        );
        let b = fingerprint(
            "notification",
            "send_receipt",
            "permanent",
            "template receipt missing for order 0192f1c2-dddd-7eee-8fff-123456789def",
        );
        let other = fingerprint(
            "notification",
            "send_receipt",
            "permanent",
            "smtp refused recipient",
        );
        assert_eq!(a, b);
        assert_ne!(a, other);
    }

    #[test]
    fn normalise_keeps_words_and_hides_values() {
        assert_eq!(
            normalise(r#"timeout after 5000ms on "orders_pkey" (id 42)"#),
            r#"timeout after <*> on "orders_pkey" (id <*>)"#
        );
    }
}

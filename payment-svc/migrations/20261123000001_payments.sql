-- One row per order: what payment knows of it, whatever event arrived first.
--   pending     no decision yet (order.created not seen, or seen and waiting for stock)
--   authorized  money held (PaymentIntent requires_capture)
--   captured    money taken
--   failed      declined: nothing held
--   voided      hold given back, or never made because the stock was gone first
--   refunded    taken and given back
--   skipped     order.created came after the order was known rejected or cancelled
CREATE TABLE payments (
    order_id        UUID PRIMARY KEY,
    -- Our own id, published with every payment event.
    payment_id      UUID        NOT NULL UNIQUE,
    status          TEXT        NOT NULL CHECK (status IN
                        ('pending', 'authorized', 'captured', 'failed', 'voided', 'refunded',
                         'skipped')),
    -- From order.created; NULL until it is seen.
    customer_id     UUID,
    amount_cents    BIGINT CHECK (amount_cents > 0),
    currency        TEXT,
    payment_method  TEXT,
    -- `stripe` or `simulated`; the provider's PaymentIntent id once authorized.
    provider        TEXT,
    intent_id       TEXT,
    -- Why it failed (the provider's decline code).
    failure_code    TEXT,
    -- Facts seen from the other services, in any order.
    reserved        BOOLEAN     NOT NULL DEFAULT false,
    rejected        BOOLEAN     NOT NULL DEFAULT false,
    -- The reason of inventory.released (`payment_failed`, `expired`, `cancelled`).
    released        TEXT,
    cancelled       BOOLEAN     NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT payments_money_needs_an_order CHECK
        (status IN ('pending', 'skipped', 'voided') OR amount_cents IS NOT NULL),
    CONSTRAINT payments_held_money_has_an_intent CHECK
        (status NOT IN ('authorized', 'captured', 'refunded') OR intent_id IS NOT NULL)
);

CREATE INDEX payments_intent ON payments (intent_id) WHERE intent_id IS NOT NULL;

-- Every call to the payment provider (one row per attempt, failed ones included) and
-- every verified webhook event, for reconciliation with the provider's records.
CREATE TABLE payment_ledger (
    id                UUID PRIMARY KEY,
    -- NULL for a webhook event about an intent we cannot tie to an order.
    order_id          UUID,
    source            TEXT        NOT NULL CHECK (source IN ('call', 'webhook')),
    -- authorize, capture, void, refund; or the webhook's event type.
    step              TEXT        NOT NULL,
    idempotency_key   TEXT,
    provider          TEXT        NOT NULL,
    intent_id         TEXT,
    -- ok, declined, transient, rejected; or the intent's status for a webhook.
    result            TEXT        NOT NULL,
    detail            TEXT,
    amount_cents      BIGINT,
    currency          TEXT,
    -- The provider's event id (webhooks): a redelivered event is recorded once.
    provider_event_id TEXT UNIQUE,
    -- The moment of the call, not the start of a transaction that may have waited.
    at                TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX payment_ledger_order ON payment_ledger (order_id, at);

-- Stock of each product, created from product.created.
CREATE TABLE stock (
    product_id UUID PRIMARY KEY,
    -- The seller who owns the product: only they (or an admin) see and adjust its stock.
    seller_id  UUID        NOT NULL,
    on_hand    BIGINT      NOT NULL,
    -- Held for orders that are not paid yet; available = on_hand - reserved.
    reserved   BIGINT      NOT NULL DEFAULT 0,
    -- Grows by one with every change; published with inventory.stock_changed.
    version    BIGINT      NOT NULL DEFAULT 1,
    -- Set by product.deleted: no new reservations, history kept.
    deleted_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The last line of defence against overselling: a bug fails its transaction.
    CONSTRAINT stock_on_hand_not_negative CHECK (on_hand >= 0),
    CONSTRAINT stock_reserved_not_negative CHECK (reserved >= 0),
    CONSTRAINT stock_reserved_within_on_hand CHECK (reserved <= on_hand)
);

-- Every change of stock: who, what, why, when, by how much, and the result.
CREATE TABLE stock_ledger (
    id             UUID PRIMARY KEY,
    product_id     UUID        NOT NULL REFERENCES stock (product_id),
    -- The stock row's version after this change: one entry per version.
    version        BIGINT      NOT NULL,
    kind           TEXT        NOT NULL CHECK (kind IN
                       ('initial', 'adjustment', 'reservation', 'release', 'commit', 'sale')),
    on_hand_delta  BIGINT      NOT NULL,
    reserved_delta BIGINT      NOT NULL,
    on_hand        BIGINT      NOT NULL,
    reserved       BIGINT      NOT NULL,
    order_id       UUID,
    reason         TEXT        NOT NULL,
    -- Who: a user (adjustments), an event (its id and type), or the expiry sweeper.
    actor_kind     TEXT        NOT NULL CHECK (actor_kind IN ('user', 'event', 'sweeper')),
    actor_id       UUID,
    event_type     TEXT,
    -- The moment of the change (not the transaction's start, which may have waited).
    at             TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT stock_ledger_one_entry_per_version UNIQUE (product_id, version)
);

CREATE INDEX stock_ledger_order ON stock_ledger (order_id) WHERE order_id IS NOT NULL;

-- What inventory knows of each order. One row per order, whatever arrived first:
--   pending   only inside the transaction handling order.created (never committed)
--   held      stock reserved until expires_at
--   committed sold (payment completed)
--   released  given back (reason: payment_failed, cancelled, expired)
--   rejected  nothing reserved (reason: out_of_stock, unknown_product)
--   tombstone a release or cancel came before order.created: reserve nothing for it
CREATE TABLE reservations (
    order_id   UUID PRIMARY KEY,
    status     TEXT        NOT NULL CHECK (status IN
                   ('pending', 'held', 'committed', 'released', 'rejected', 'tombstone')),
    reason     TEXT,
    expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT reservations_held_expire CHECK (status <> 'held' OR expires_at IS NOT NULL)
);

-- The sweeper's question: which held reservations are past their time.
CREATE INDEX reservations_held_expiry ON reservations (expires_at) WHERE status = 'held';

-- The order's lines, one per product (quantities of repeated products summed).
CREATE TABLE reservation_lines (
    order_id   UUID   NOT NULL REFERENCES reservations (order_id),
    product_id UUID   NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);

-- What inventory did with each event of an order's saga, including the ones that
-- changed nothing (a duplicate, a late order.created after a cancel), for people
-- following one order.
CREATE TABLE reservation_history (
    id         UUID PRIMARY KEY,
    order_id   UUID        NOT NULL REFERENCES reservations (order_id),
    -- The event type, or `sweeper`.
    cause      TEXT        NOT NULL,
    event_id   UUID,
    outcome    TEXT        NOT NULL,
    -- Not now(): a transaction that waited for another's lock must sort after it.
    at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX reservation_history_order ON reservation_history (order_id, at);

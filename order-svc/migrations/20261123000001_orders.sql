-- What order-svc knows of the catalog, replicated from product.created / .updated /
-- .deleted, so that placing an order calls no other service.
CREATE TABLE products (
    product_id    UUID PRIMARY KEY,
    seller_id     UUID        NOT NULL,
    -- NULL only for a tombstone: product.deleted arrived before anything else.
    name          TEXT,
    price_cents   BIGINT,
    currency      TEXT,
    -- The product's own time of the fact kept (created_at or updated_at): an older
    -- update arriving late never overwrites a newer one.
    version_at    TIMESTAMPTZ NOT NULL,
    -- Set by product.deleted, and never cleared: a delete wins over any update.
    deleted_at    TIMESTAMPTZ,
    replicated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT products_terms_known CHECK (
        deleted_at IS NOT NULL
        OR (name IS NOT NULL AND price_cents IS NOT NULL AND currency IS NOT NULL)),
    CONSTRAINT products_price_not_negative CHECK (price_cents >= 0)
);

CREATE TABLE orders (
    id             UUID PRIMARY KEY,
    customer_id    UUID        NOT NULL,
    status         TEXT        NOT NULL CHECK (status IN ('pending', 'paid', 'cancelled')),
    status_reason  TEXT CHECK (status_reason IN
                       ('out_of_stock', 'payment_declined', 'reservation_expired',
                        'customer_cancelled')),
    total_cents    BIGINT      NOT NULL CHECK (total_cents >= 0),
    currency       TEXT        NOT NULL,
    payment_method TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT orders_reason_iff_cancelled CHECK ((status = 'cancelled') = (status_reason IS NOT NULL))
);

-- Lists, newest first: a customer's own, and all of them (admins).
CREATE INDEX orders_customer_newest ON orders (customer_id, created_at DESC, id DESC);
CREATE INDEX orders_newest ON orders (created_at DESC, id DESC);

-- The lines as ordered, priced from the replica at the time of the order.
CREATE TABLE order_lines (
    order_id         UUID    NOT NULL REFERENCES orders (id),
    line_no          INT     NOT NULL,
    product_id       UUID    NOT NULL,
    seller_id        UUID    NOT NULL,
    name             TEXT    NOT NULL,
    quantity         BIGINT  NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    unit_price_cents BIGINT  NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, line_no),
    CONSTRAINT order_lines_one_per_product UNIQUE (order_id, product_id)
);

-- Every saga event that reached the order, and the order's own events. The saga's
-- state is read from here: the set of facts seen, whatever their arrival order.
CREATE TABLE order_history (
    seq         BIGSERIAL PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (id),
    event_type  TEXT        NOT NULL,
    -- One entry per event, even if a copy slipped past the inbox.
    event_id    UUID        NOT NULL UNIQUE,
    -- The reason an event carries (inventory.released: expired, payment.failed: …).
    detail      TEXT,
    occurred_at TIMESTAMPTZ NOT NULL,
    -- When it reached order-svc; not now(), which is the start of a transaction that
    -- may have waited for the order's lock.
    at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX order_history_order ON order_history (order_id, seq);

-- Idempotent placement: one order per customer and key. The primary key, not a
-- lookup, is what makes two simultaneous requests with one key create one order.
CREATE TABLE idempotency_keys (
    customer_id  UUID        NOT NULL,
    key          TEXT        NOT NULL,
    -- SHA-256 of the canonical request: same key with another body is refused.
    request_hash BYTEA       NOT NULL,
    -- Checked at commit: the key is claimed first, the order written after it.
    order_id     UUID        NOT NULL REFERENCES orders (id) DEFERRABLE INITIALLY DEFERRED,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, key)
);

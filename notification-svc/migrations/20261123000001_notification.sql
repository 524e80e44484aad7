-- What notification-svc keeps from other services' events, to address and word its mail.

-- Who a user is, from user.registered.
CREATE TABLE contacts (
    user_id    UUID PRIMARY KEY,
    email      TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A product's name and seller, from product.created / .updated / .deleted. Events may
-- arrive in any order: `changed_at` is the time the producer stamped on the data held
-- (created_at or updated_at), so an older event never overwrites a newer one. A delete
-- arriving first leaves a row without a name until its product.created comes.
CREATE TABLE products (
    product_id UUID PRIMARY KEY,
    seller_id  UUID        NOT NULL,
    name       TEXT,
    changed_at TIMESTAMPTZ,
    deleted_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The order as placed (order.created), for the cancellation mail.
CREATE TABLE orders (
    order_id    UUID PRIMARY KEY,
    customer_id UUID        NOT NULL,
    -- [{product_id, seller_id, quantity, unit_price_cents}]
    lines       JSONB       NOT NULL,
    total_cents BIGINT      NOT NULL,
    currency    TEXT        NOT NULL,
    placed_at   TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every mail handed to the SMTP server (or written as .eml), one row per
-- (event, recipient, template). Written right after each send in its own transaction,
-- outside the consumer's, so that a retry of the event skips the mails already sent.
CREATE TABLE notifications (
    id           UUID PRIMARY KEY,
    event_id     UUID        NOT NULL,
    event_type   TEXT        NOT NULL,
    recipient_id UUID        NOT NULL,
    to_address   TEXT        NOT NULL,
    template     TEXT        NOT NULL,
    subject      TEXT        NOT NULL,
    -- `smtp` or `file`, and what it said: the server's reply or the file written.
    transport    TEXT        NOT NULL CHECK (transport IN ('smtp', 'file')),
    receipt      TEXT        NOT NULL,
    sent_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT notifications_once UNIQUE (event_id, recipient_id, template)
);

-- The admin list: by recipient, newest first.
CREATE INDEX notifications_to ON notifications (lower(to_address), id DESC);

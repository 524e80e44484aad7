-- Tables of the messaging kernel, present in every service database.

-- Events waiting to be published; a row is deleted once the broker confirms it.
CREATE TABLE outbox (
    seq            BIGSERIAL PRIMARY KEY,
    message_id     UUID        NOT NULL,
    exchange       TEXT        NOT NULL,
    routing_key    TEXT        NOT NULL,
    event_type     TEXT        NOT NULL,
    correlation_id TEXT,
    headers        JSONB       NOT NULL DEFAULT '{}',
    -- The exact bytes to publish.
    body           BYTEA       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts       INT         NOT NULL DEFAULT 0,
    last_error     TEXT
);

-- Wakes the relay when a transaction that wrote to the outbox commits.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: a message id is here once its handler's transaction committed.
CREATE TABLE processed_messages (
    message_id   UUID PRIMARY KEY,
    handler      TEXT        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Messages this service gave up on, for people to inspect, replay or discard.
CREATE TABLE dead_letters (
    id                   UUID PRIMARY KEY,
    message_id           TEXT        NOT NULL UNIQUE,
    event_type           TEXT,
    correlation_id       TEXT,
    service              TEXT        NOT NULL,
    handler              TEXT        NOT NULL,
    error_kind           TEXT        NOT NULL,
    error_message        TEXT        NOT NULL,
    error_chain          TEXT        NOT NULL,
    fingerprint          TEXT        NOT NULL,
    attempts             INT         NOT NULL,
    first_failed_at      TIMESTAMPTZ NOT NULL,
    last_failed_at       TIMESTAMPTZ NOT NULL,
    original_exchange    TEXT        NOT NULL,
    original_routing_key TEXT        NOT NULL,
    headers              JSONB       NOT NULL,
    body                 BYTEA       NOT NULL,
    status               TEXT        NOT NULL DEFAULT 'open'
                         CHECK (status IN ('open', 'replayed', 'discarded')),
    -- Times this message reached the dead-letter queue (again after a failed replay).
    dead_lettered_count  INT         NOT NULL DEFAULT 1,
    replay_count         INT         NOT NULL DEFAULT 0,
    received_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at          TIMESTAMPTZ,
    replayed_by          TEXT,
    discarded_at         TIMESTAMPTZ,
    discarded_by         TEXT
);

CREATE INDEX dead_letters_status_fingerprint ON dead_letters (status, fingerprint);
CREATE INDEX dead_letters_last_failed_at ON dead_letters (last_failed_at DESC);

-- Dead-letter administration: paced replays and the audit log.

-- Replays asked for and not yet handed to the outbox. The set is fixed when the operator
-- asks; a background task moves rows to the outbox at the configured rate, so replaying
-- a large group does not flood the service.
CREATE TABLE dead_letter_replays (
    seq            BIGSERIAL PRIMARY KEY,
    dead_letter_id UUID        NOT NULL UNIQUE REFERENCES dead_letters (id) ON DELETE CASCADE,
    operator       TEXT        NOT NULL,
    queued_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every replay and discard: who, when, what, and what came of it.
CREATE TABLE dead_letter_audit (
    id          UUID PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    operator    TEXT        NOT NULL,
    action      TEXT        NOT NULL CHECK (action IN ('replay', 'discard')),
    -- The group asked for, when the operator named one.
    fingerprint TEXT,
    -- The dead letters asked for (for a group: its open members at that moment).
    requested   UUID[]      NOT NULL,
    -- Those actually replayed or discarded (the others were not open).
    affected    UUID[]      NOT NULL
);

CREATE INDEX dead_letter_audit_at ON dead_letter_audit (at DESC, id DESC);
CREATE INDEX dead_letters_discarded_at ON dead_letters (discarded_at)
    WHERE status = 'discarded';

-- Who sells each product, kept from product events (products.rs). Rows are never
-- removed: a deleted product keeps a tombstone so that late events cannot revive it.
CREATE TABLE products (
    id           UUID PRIMARY KEY,
    seller_id    UUID        NOT NULL,
    -- Time of the event that named seller_id; an older event arriving late loses.
    seller_as_of TIMESTAMPTZ NOT NULL,
    deleted_at   TIMESTAMPTZ
);

-- One uploaded image of a product. The bytes are on disk under their SHA-256 (hex),
-- shared by every row with the same content.
CREATE TABLE files (
    id                     UUID PRIMARY KEY,
    product_id             UUID        NOT NULL REFERENCES products (id),
    uploaded_by            UUID        NOT NULL,
    sha256                 TEXT        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    content_type           TEXT        NOT NULL,
    bytes                  BIGINT      NOT NULL CHECK (bytes > 0),
    width                  INTEGER     NOT NULL CHECK (width > 0),
    height                 INTEGER     NOT NULL CHECK (height > 0),
    thumbnail_sha256       TEXT        NOT NULL CHECK (thumbnail_sha256 ~ '^[0-9a-f]{64}$'),
    thumbnail_content_type TEXT        NOT NULL,
    thumbnail_bytes        BIGINT      NOT NULL CHECK (thumbnail_bytes > 0),
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The same bytes uploaded again for the same product are the same image.
    CONSTRAINT files_product_content_unique UNIQUE (product_id, sha256)
);

-- The catalog: categories (a tree), products, and what product-svc keeps from other
-- services' events (stock, images, purchases), plus reviews.

-- Adjacency list: listing a category walks its sub-tree with a recursive CTE. Categories
-- are few and never move, so the walk is cheap and nothing has to be rewritten.
CREATE TABLE categories (
    id         UUID PRIMARY KEY,
    slug       TEXT NOT NULL CONSTRAINT categories_slug_unique UNIQUE,
    name       TEXT NOT NULL,
    parent_id  UUID REFERENCES categories (id),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX categories_parent ON categories (parent_id);

CREATE TABLE products (
    id            UUID PRIMARY KEY,
    seller_id     UUID NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    price_cents   BIGINT NOT NULL CONSTRAINT products_price_positive CHECK (price_cents > 0),
    currency      TEXT NOT NULL CONSTRAINT products_currency_code CHECK (currency ~ '^[A-Z]{3}$'),
    category_id   UUID REFERENCES categories (id),
    initial_stock BIGINT NOT NULL CONSTRAINT products_initial_stock CHECK (initial_stock >= 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Deleted products keep their row: reviews, purchases and events refer to them.
    deleted_at    TIMESTAMPTZ,
    -- English stemming ("phones" finds "phone"); name matches rank above description.
    search        TSVECTOR GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, name), 'A') ||
        setweight(to_tsvector('english'::regconfig, description), 'B')
    ) STORED
);

CREATE INDEX products_search ON products USING GIN (search);
CREATE INDEX products_seller ON products (seller_id, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX products_category ON products (category_id, id DESC) WHERE deleted_at IS NULL;

-- Availability as inventory-svc last reported it. No foreign key: events are kept
-- whatever order they come in.
CREATE TABLE stock (
    product_id UUID PRIMARY KEY,
    on_hand    BIGINT NOT NULL,
    reserved   BIGINT NOT NULL,
    available  BIGINT NOT NULL,
    -- inventory-svc's per-product version: an older one never overwrites a newer one.
    version    BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Images file-svc stored for a product; the file id makes a repeated event harmless.
CREATE TABLE product_images (
    id            UUID PRIMARY KEY,
    product_id    UUID NOT NULL,
    url           TEXT NOT NULL,
    thumbnail_url TEXT NOT NULL,
    uploaded_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX product_images_product ON product_images (product_id, uploaded_at, id);

-- Who bought what (from order.paid): the right to review.
CREATE TABLE purchases (
    customer_id UUID NOT NULL,
    product_id  UUID NOT NULL,
    order_id    UUID NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, product_id, order_id)
);

CREATE TABLE reviews (
    id          UUID PRIMARY KEY,
    product_id  UUID NOT NULL REFERENCES products (id),
    customer_id UUID NOT NULL,
    rating      SMALLINT NOT NULL CONSTRAINT reviews_rating CHECK (rating BETWEEN 1 AND 5),
    body        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT reviews_one_per_customer UNIQUE (product_id, customer_id)
);

CREATE INDEX reviews_product ON reviews (product_id, id DESC);

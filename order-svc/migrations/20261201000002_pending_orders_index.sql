-- The pending orders, oldest first: what the `orders_pending` and
-- `orders_oldest_pending_age_seconds` gauges read every few seconds, and what an
-- operator lists to find stuck orders (docs/RUNBOOK.md). Small: orders leave it at the
-- end of their saga.
CREATE INDEX orders_pending ON orders (created_at) WHERE status = 'pending';

-- The inbox purge deletes by age; rows arrive in time order, so a BRIN index finds old
-- ones at almost no cost to each insert.
CREATE INDEX processed_messages_processed_at ON processed_messages USING brin (processed_at);

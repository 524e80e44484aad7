-- A mail goes out once per (fact, recipient, template), the fact being what it is about
-- (the order paid or cancelled, the user registered, the review): a copy of an event
-- published again under a new id must not mail anyone twice. Rows written before keep
-- their event as their fact.
ALTER TABLE notifications ADD COLUMN fact_id UUID;
UPDATE notifications SET fact_id = event_id;
ALTER TABLE notifications ALTER COLUMN fact_id SET NOT NULL;
ALTER TABLE notifications DROP CONSTRAINT notifications_once;
ALTER TABLE notifications
    ADD CONSTRAINT notifications_once UNIQUE (fact_id, recipient_id, template);

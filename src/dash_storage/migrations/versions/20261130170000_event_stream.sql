-- Migration: event_stream
-- Created: 2026-11-30T17:00:00Z

-- The event log as a stream that followers read in an order consistent with commits, with no
-- gap and no duplicate, even while transactions commit out of order.
--
-- Neither a timestamp nor a sequence number gives commit order: both are taken before commit, so
-- a reader that has moved past a value can later see a row with a smaller one. Instead every row
-- carries the id of the transaction that wrote it (tx_id), and a reader only delivers rows whose
-- transaction id is below the oldest transaction still running anywhere on the server
-- (pg_snapshot_xmin of the current snapshot). Every transaction below that mark has finished, so
-- the set of rows below it is final: nothing can appear there later, and rolled-back rows never
-- do. Rows are delivered in (tx_id, seq) order; seq orders the rows of one transaction. A
-- transaction that commits after another has started can only have a larger id if it got its id
-- later, so "committed before the other began" always means "delivered first".
--
-- The price: a transaction that stays open holds the mark back, and with it every follower
-- (dash-db doctor shows the oldest open transaction).
--
-- Existing rows get tx_id 0 and a seq in their physical order: they come first, once.
-- The sequence hands each session 1,000 values at a time: one transaction's rows still get
-- increasing numbers (a transaction runs in one session), and ingest does not pay a shared
-- sequence update per row. Order across transactions comes from tx_id, not from seq.
ALTER TABLE events
    ADD COLUMN seq   BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    ADD COLUMN tx_id XID8 NOT NULL DEFAULT '0';
ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id();

-- why: EventRepository.follow and the Redis relay read "after position (tx_id, seq), below the
-- mark" as one ordered index range; inserts land at the right edge (ids only grow).
CREATE INDEX events_stream_idx ON events (tx_id, seq);

-- Followers sleep on LISTEN dash_events and wake when a transaction that wrote events commits.
-- A statement-level trigger with a constant payload: PostgreSQL folds identical notifications
-- of one transaction into one, so a transaction sends at most one, however many rows it wrote.
CREATE FUNCTION dash_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dash_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION dash_events_notify();

-- Where a named reader of the stream (the Redis relay, or a follower that saves its place) has
-- got to. position is the opaque cursor string that follow() takes and gives.
CREATE TABLE stream_cursors (
    name       TEXT        PRIMARY KEY,
    position   TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT stream_cursors_name_check CHECK (length(name) BETWEEN 1 AND 200)
);

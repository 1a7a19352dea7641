-- Migration: event_partitions
-- Created: 2026-11-30T19:05:00Z

-- The event log becomes a table range-partitioned by "timestamp" (native partitioning, no
-- extension), so that old events go by dropping whole partitions (no row-by-row DELETE, no bloat)
-- and queries bounded in time only read the partitions they need.
--
-- There is no DEFAULT partition: adding a partition next to a default one would have to scan it
-- for rows of the new range, under a lock. Instead a partition is created before the first event
-- that needs it is written: migrate and dash-db maintain create them ahead of time, and the
-- library creates the one an event needs (far in the past or in the future) before writing it,
-- with dash_event_partitions_ensure below. Partitions are aligned on UTC and are a whole number of
-- hours long (a day by default).
--
-- The primary key is (id, "timestamp"): a unique key of a partitioned table must contain its
-- partition column. The library fixes an event's timestamp before the event is first sent, so a
-- retried create repeats both and lands on the same key, in the same partition.
--
-- The existing rows are copied into the new table in this one transaction, with their stream
-- positions (tx_id, seq) kept; the migration fails, changing nothing, unless the row count and a
-- checksum of every row's content agree before and after. Writers wait while it runs (the old
-- table is locked); the time it takes is in the README.

-- event_stats_24h reads events; it is rebuilt over the hourly rollups by the next migration.
DROP VIEW event_stats_24h;

ALTER TABLE events RENAME TO events_unpartitioned;
ALTER SEQUENCE events_seq_seq RENAME TO events_unpartitioned_seq_seq;
ALTER INDEX events_pkey RENAME TO events_unpartitioned_pkey;
ALTER INDEX events_swarm_id_timestamp_idx RENAME TO events_unpartitioned_swarm_id_timestamp_idx;
ALTER INDEX events_agent_id_timestamp_idx RENAME TO events_unpartitioned_agent_id_timestamp_idx;
ALTER INDEX events_timestamp_idx RENAME TO events_unpartitioned_timestamp_idx;
ALTER INDEX events_stream_idx RENAME TO events_unpartitioned_stream_idx;
DROP TRIGGER events_notify ON events_unpartitioned;

-- The same columns, in the same order. Keys, foreign keys and indexes are added once the rows are
-- in (one index build per partition instead of one insertion per row).
CREATE TABLE events (
    id              UUID        NOT NULL DEFAULT gen_random_uuid(),
    swarm_id        UUID        NOT NULL,
    agent_id        UUID,
    type            TEXT        NOT NULL,
    payload         JSONB       NOT NULL DEFAULT '{}',
    timestamp       TIMESTAMPTZ NOT NULL DEFAULT now(),
    correlation_id  TEXT,
    -- Deliberately no foreign key: the log is append-only and ingest must stay one cheap insert.
    parent_event_id UUID,
    entity_type     TEXT        NOT NULL DEFAULT 'system',
    severity        TEXT        NOT NULL DEFAULT 'info',
    seq             BIGINT      GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    tx_id           XID8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT events_entity_type_check CHECK (entity_type IN ('agent', 'task', 'system')),
    CONSTRAINT events_severity_check CHECK (severity IN
        ('debug', 'info', 'warning', 'error', 'critical'))
) PARTITION BY RANGE ("timestamp");

-- The partitions of events with their bounds, read from the catalog (a partition attached or
-- detached by hand is seen too). A bound of MINVALUE / MAXVALUE reads as -infinity / infinity.
CREATE VIEW event_partitions AS
SELECT c.relname::text AS name,
       (CASE WHEN b[1] = 'MINVALUE' THEN '-infinity' ELSE b[1] END)::timestamptz AS lower_bound,
       (CASE WHEN b[2] = 'MAXVALUE' THEN 'infinity' ELSE b[2] END)::timestamptz AS upper_bound,
       pg_total_relation_size(c.oid) AS total_bytes,
       greatest(c.reltuples, 0)::bigint AS estimated_rows
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                $re$FROM \('?([^')]*)'?\) TO \('?([^')]*)'?\)$re$) AS b
WHERE i.inhparent = 'events'::regclass AND b IS NOT NULL;

-- Creates the partitions that hold the given points in time, if they are missing, and returns
-- how many it created. A new partition spans the UTC-aligned slot of `width` (a whole number of
-- hours) around its point, cut short where it would overlap a partition that already exists (so
-- a changed width never collides with the partitions made before). A new partition is created
-- empty and then attached, which takes only a SHARE UPDATE EXCLUSIVE lock on events: writers and
-- readers go on. Callers serialise on an advisory lock, so two of them never race to create the
-- same partition.
CREATE FUNCTION dash_event_partitions_ensure(points timestamptz[], width interval)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    point timestamptz;
    lo timestamptz;
    hi timestamptz;
    below timestamptz;
    above timestamptz;
    part text;
    made integer := 0;
BEGIN
    IF width IS NULL OR width < interval '1 hour' OR width > interval '366 days'
       OR extract(epoch FROM width)::numeric % 3600 <> 0 OR date_part('month', width) <> 0 THEN
        RAISE EXCEPTION 'event partition width must be a whole number of hours from 1 hour to 366 days, not %', width
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(4410, 1);
    -- The points no partition holds (the catalog is read once), then each of them again: a
    -- partition just created may hold the next ones.
    FOR point IN
        WITH parts AS MATERIALIZED (SELECT p.lower_bound, p.upper_bound FROM event_partitions p)
        SELECT DISTINCT u.point FROM unnest(points) AS u(point)
        WHERE u.point IS NOT NULL AND isfinite(u.point) AND NOT EXISTS (
            SELECT 1 FROM parts p WHERE u.point >= p.lower_bound AND u.point < p.upper_bound)
        ORDER BY u.point
    LOOP
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM event_partitions p WHERE point >= p.lower_bound AND point < p.upper_bound);
        lo := date_bin(width, point, timestamptz '1970-01-01 00:00:00+00');
        hi := lo + width;
        SELECT max(p.upper_bound) INTO below FROM event_partitions p WHERE p.upper_bound <= point;
        SELECT min(p.lower_bound) INTO above FROM event_partitions p WHERE p.lower_bound > point;
        lo := greatest(lo, below);
        hi := least(hi, above);
        part := 'events_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MI');
        EXECUTE format('CREATE TABLE %I (LIKE events INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION)', part);
        EXECUTE format('ALTER TABLE events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        made := made + 1;
    END LOOP;
    RETURN made;
END
$$;

-- One day-long partition for every day that has events, and for yesterday to a week ahead.
SELECT dash_event_partitions_ensure(ARRAY(
    SELECT DISTINCT date_bin('1 day', "timestamp", timestamptz '1970-01-01 00:00:00+00')
    FROM events_unpartitioned), interval '1 day');
SELECT dash_event_partitions_ensure(ARRAY(
    SELECT generate_series(now() - interval '1 day', now() + interval '7 days', interval '1 day')),
    interval '1 day');

INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                    parent_event_id, entity_type, severity, seq, tx_id)
OVERRIDING SYSTEM VALUE
SELECT id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
       entity_type, severity, seq, tx_id
FROM events_unpartitioned;

-- Every row arrived, unchanged: count and an order-independent checksum of each row's full text.
DO $$
DECLARE
    before record;
    after record;
BEGIN
    SELECT count(*) AS n, coalesce(sum(hashtextextended(e::text, 0)::numeric), 0) AS sum
    INTO before FROM events_unpartitioned e;
    SELECT count(*) AS n, coalesce(sum(hashtextextended(e::text, 0)::numeric), 0) AS sum
    INTO after FROM events e;
    IF before IS DISTINCT FROM after THEN
        RAISE EXCEPTION 'converting events to partitions would change the log: % rows (checksum %) before, % rows (checksum %) after',
            before.n, before.sum, after.n, after.sum;
    END IF;
END
$$;

-- New rows continue the stream's sequence.
SELECT setval(pg_get_serial_sequence('events', 'seq'),
              greatest((SELECT last_value FROM events_unpartitioned_seq_seq),
                       (SELECT coalesce(max(seq), 0) FROM events), 1));

DROP TABLE events_unpartitioned;

ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id, "timestamp");
ALTER TABLE events ADD CONSTRAINT events_swarm_id_fkey
    FOREIGN KEY (swarm_id) REFERENCES swarms (id) ON DELETE CASCADE;
ALTER TABLE events ADD CONSTRAINT events_agent_id_fkey
    FOREIGN KEY (agent_id) REFERENCES agents (id) ON DELETE SET NULL;

-- The indexes of the unpartitioned table, now one per partition (see the initial schema for why
-- each exists). Every read bounded in time prunes to the partitions of its range.
CREATE INDEX events_swarm_id_timestamp_idx ON events (swarm_id, "timestamp", id);
CREATE INDEX events_agent_id_timestamp_idx ON events (agent_id, "timestamp", id)
    WHERE agent_id IS NOT NULL;
CREATE INDEX events_timestamp_idx ON events ("timestamp", id);
CREATE INDEX events_stream_idx ON events (tx_id, seq);

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION dash_events_notify();

ANALYZE events;

-- The time partitions of the event log and its rollups (repositories/event_partitions.py,
-- repositories/event_rollups.py). The functions called here are defined by the migrations
-- event_partitions and event_rollups.

-- name: select_partitions
-- Every partition of events, oldest first, with its size. Bounds are clamped to what a Python
-- datetime holds (years 1 to 9999): a partition of the last day of 9999 ends in the year 10000.
SELECT name, greatest(lower_bound, timestamptz '0001-01-01 00:00:00+00'),
       least(upper_bound, timestamptz '9999-12-31 23:59:59.999999+00'), total_bytes, estimated_rows
FROM event_partitions
ORDER BY lower_bound;

-- name: ensure_partitions
-- Creates the partitions that hold these points in time, if missing ($2: the width of a new one).
SELECT dash_event_partitions_ensure($1::timestamptz[], $2::interval);

-- name: select_clock
-- The database clock, now (not the transaction's start).
SELECT clock_timestamp();

-- name: select_partitions_to_prune
-- The partitions wholly before the cutoff (their upper bound at or before it), oldest first.
SELECT name, greatest(lower_bound, timestamptz '0001-01-01 00:00:00+00'), upper_bound, total_bytes,
       estimated_rows
FROM event_partitions
WHERE upper_bound <= $1
ORDER BY lower_bound;

-- name: select_cutoff
-- "now minus this many seconds" on the database clock.
SELECT now() - make_interval(secs => $1::float8);

-- name: select_leftovers
-- Tables a prune detached but did not get to drop (it marks them before detaching), with the mark.
SELECT c.relname::text, obj_description(c.oid, 'pg_class')
FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
  AND obj_description(c.oid, 'pg_class') LIKE 'dash: pruned event partition %'
ORDER BY 1;

-- name: select_detach_pending
-- Partitions whose DETACH ... CONCURRENTLY was interrupted (to be finished with FINALIZE).
SELECT c.relname::text
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass AND i.inhdetachpending
ORDER BY 1;

-- name: count_partition_rows
-- The exact number of rows in one partition, read through the parent with its range ($1, $2)
-- so that the planner prunes to that partition.
SELECT count(*) FROM events WHERE "timestamp" >= $1 AND "timestamp" < $2;

-- name: lock_rollups
-- Prunes, refreshes and the rollup triggers serialise on this lock (see the event_rollups
-- migration).
SELECT pg_advisory_xact_lock(4410, 2);

-- name: delete_rollups_in_range
-- The rollups of a time range whose events were dropped. The spans are named so that the primary
-- keys (span_seconds, bucket, ...) find the range; without them each prune of a partition would
-- read both rollup tables whole.
WITH counts AS (
    DELETE FROM event_counts WHERE span_seconds IN (60, 3600) AND bucket >= $1 AND bucket < $2
)
DELETE FROM event_actor_counts WHERE span_seconds IN (60, 3600) AND bucket >= $1 AND bucket < $2;

-- name: refresh_rollups
-- Adds up to $1 events past the rollups' position to them; NULL if another session is at it and
-- $2 (wait) is false.
SELECT dash_event_rollups_refresh($1::int, $2::bool);

-- name: select_event_counts
-- Events at or after now() - $1 seconds by type and severity, totals included, from the rollups
-- plus the raw events they do not hold (dash_event_counts); the raw tail's size comes too.
SELECT GROUPING(type) AS g_type, GROUPING(severity) AS g_severity, type, severity,
       sum(events)::bigint
FROM dash_event_counts(now() - make_interval(secs => $1::float8))
GROUP BY GROUPING SETS ((type), (severity), ());

-- name: select_rollup_lag
-- How many events the rollups have not reached yet (read up to $1, to bound the cost).
SELECT count(*) FROM (
    SELECT 1 FROM events e,
         (SELECT coalesce(max(tx_id), '0') AS tx_id, coalesce(max(seq), 0) AS seq
          FROM event_rollup_position) p
    WHERE (e.tx_id, e.seq) > (p.tx_id, p.seq)
    LIMIT $1
) t;

-- name: select_rollup_position
-- Where the rollups have got to, and when they last moved.
SELECT tx_id::text, seq, updated_at FROM event_rollup_position;

-- name: statement_comment
-- The DDL a prune runs on one partition, with its name quoted by the server: mark it (the mark
-- carries its range, for the rollups, should the prune stop before dropping it) ...
SELECT format('COMMENT ON TABLE %I IS %L', $1::text, $2::text);

-- name: statement_detach
-- ... detach it without blocking writers or readers (outside any transaction) ...
SELECT format('ALTER TABLE events DETACH PARTITION %I CONCURRENTLY', $1::text);

-- name: statement_finalize
-- ... finish a detach that was interrupted ...
SELECT format('ALTER TABLE events DETACH PARTITION %I FINALIZE', $1::text);

-- name: statement_drop
-- ... and drop it.
SELECT format('DROP TABLE %I', $1::text);

-- name: try_lock_maintenance
-- dash-db maintain runs once at a time across every host: a session lock on its own connection.
SELECT pg_try_advisory_lock(4410, 3);

-- name: unlock_maintenance
SELECT pg_advisory_unlock(4410, 3);

-- Migration: event_rollups
-- Created: 2026-11-30T19:06:00Z

-- Exact event counts without reading every event: per-minute and per-hour rollups, filled from
-- the gap-free event stream, plus the raw events the rollups do not hold yet.
--
-- dash_event_rollups_refresh reads the events after the rollups' position in stream order (tx_id,
-- seq), only below the oldest transaction still running (the same mark as the stream's
-- followers: every row below it is final), adds them to the rollups and moves the position, in
-- one transaction. So at any moment the rollups hold exactly the events at or before their
-- position, and a reader counts the rest raw: the events after the position that its snapshot
-- sees. No writer touches a rollup row: inserting events costs nothing here, and 50 agents
-- writing the same type in the same hour never wait for each other.
--
-- A window "the last N hours" is the whole hours inside it (hourly rows), the whole minutes of
-- its first partial hour (minute rows) and its first partial minute (raw events at or before the
-- position, by the timestamp index): at most a minute of events is read raw, however big the log.
-- The first and last event of a type are found the same way: the first and last minute that has
-- one, then that minute's events, in time order, up to the first of that type.
--
-- Events are append-only, but deleting a swarm deletes its events (ON DELETE CASCADE) and
-- deleting an agent clears their agent_id (ON DELETE SET NULL). Statement triggers take the
-- changed rows that the rollups hold out of them (and put an UPDATE's new versions in), in the
-- same transaction: counts are only ever added and subtracted, nothing is recounted. TRUNCATE empties the rollups. Dropping old partitions (dash-db prune) deletes the
-- rollups of the same range.

-- Where the rollups have got to in the event stream. One row; none means the beginning.
CREATE TABLE event_rollup_position (
    singleton  BOOLEAN     PRIMARY KEY DEFAULT true,
    tx_id      XID8        NOT NULL,
    seq        BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT event_rollup_position_singleton_check CHECK (singleton)
);

-- Events by type and severity per minute (span_seconds 60) and per hour (3600). A row whose count
-- went down to 0 (its events were deleted) may remain until the next refresh; readers skip it.
CREATE TABLE event_counts (
    span_seconds INTEGER     NOT NULL,
    bucket       TIMESTAMPTZ NOT NULL,
    type         TEXT        NOT NULL,
    severity     TEXT        NOT NULL,
    events       BIGINT      NOT NULL,
    CONSTRAINT event_counts_span_check CHECK (span_seconds IN (60, 3600)),
    CONSTRAINT event_counts_pkey PRIMARY KEY (span_seconds, bucket, type, severity)
);

-- why: the first and last minute that holds events of a type (dash_event_type_stats).
CREATE INDEX event_counts_type_idx ON event_counts (span_seconds, type, bucket);

-- Events by type, swarm and agent per minute and per hour: what counting distinct agents and
-- swarms needs. agent_id is the nil UUID for events without an agent (a key column cannot be
-- NULL).
CREATE TABLE event_actor_counts (
    span_seconds INTEGER     NOT NULL,
    bucket       TIMESTAMPTZ NOT NULL,
    type         TEXT        NOT NULL,
    swarm_id     UUID        NOT NULL,
    agent_id     UUID        NOT NULL,
    events       BIGINT      NOT NULL,
    CONSTRAINT event_actor_counts_span_check CHECK (span_seconds IN (60, 3600)),
    CONSTRAINT event_actor_counts_pkey PRIMARY KEY (span_seconds, bucket, type, swarm_id, agent_id)
);

-- Adds events to the counts, the actor counts or both (a refresh's batch, an UPDATE's new rows).
CREATE FUNCTION dash_event_rollups_add(rows events[], counts boolean, actors boolean)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO event_counts AS c (span_seconds, bucket, type, severity, events)
    SELECT s.span, date_bin(make_interval(secs => s.span), r."timestamp", timestamptz '1970-01-01 00:00:00+00'),
           r.type, r.severity, count(*)
    FROM unnest(rows) AS r CROSS JOIN (VALUES (60), (3600)) AS s(span)
    WHERE counts
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (span_seconds, bucket, type, severity) DO UPDATE SET events = c.events + excluded.events;
    INSERT INTO event_actor_counts AS c (span_seconds, bucket, type, swarm_id, agent_id, events)
    SELECT s.span, date_bin(make_interval(secs => s.span), r."timestamp", timestamptz '1970-01-01 00:00:00+00'),
           r.type, r.swarm_id, coalesce(r.agent_id, '00000000-0000-0000-0000-000000000000'), count(*)
    FROM unnest(rows) AS r CROSS JOIN (VALUES (60), (3600)) AS s(span)
    WHERE actors
    GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (span_seconds, bucket, type, swarm_id, agent_id) DO UPDATE SET events = c.events + excluded.events;
$$;

-- Takes events the rollups held (deleted rows, an UPDATE's old rows) out of the counts, the actor
-- counts or both.
CREATE FUNCTION dash_event_rollups_remove(rows events[], counts boolean, actors boolean)
RETURNS void
LANGUAGE sql AS $$
    UPDATE event_counts c SET events = c.events - g.n
    FROM (
        SELECT s.span, date_bin(make_interval(secs => s.span), r."timestamp", timestamptz '1970-01-01 00:00:00+00') AS bucket,
               r.type, r.severity, count(*) AS n
        FROM unnest(rows) AS r CROSS JOIN (VALUES (60), (3600)) AS s(span)
        WHERE counts
        GROUP BY 1, 2, 3, 4
    ) g
    WHERE c.span_seconds = g.span AND c.bucket = g.bucket AND c.type = g.type AND c.severity = g.severity;
    UPDATE event_actor_counts c SET events = c.events - g.n
    FROM (
        SELECT s.span, date_bin(make_interval(secs => s.span), r."timestamp", timestamptz '1970-01-01 00:00:00+00') AS bucket,
               r.type, r.swarm_id, coalesce(r.agent_id, '00000000-0000-0000-0000-000000000000') AS agent_id,
               count(*) AS n
        FROM unnest(rows) AS r CROSS JOIN (VALUES (60), (3600)) AS s(span)
        WHERE actors
        GROUP BY 1, 2, 3, 4, 5
    ) g
    WHERE c.span_seconds = g.span AND c.bucket = g.bucket AND c.type = g.type
      AND c.swarm_id = g.swarm_id AND c.agent_id = g.agent_id;
$$;

-- Adds up to max_rows events past the position to the rollups and moves the position past them;
-- deletes rows whose count went down to 0. Returns how many events it added, or NULL if another
-- session holds the rollups (when wait is false). Refreshes, the triggers below and prunes take
-- one advisory lock before they read, so each sees what the one before it committed.
CREATE FUNCTION dash_event_rollups_refresh(max_rows integer, wait boolean)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    batch events[];
    last_tx xid8;
    last_seq bigint;
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock(4410, 2);
    ELSIF NOT pg_try_advisory_xact_lock(4410, 2) THEN
        RETURN NULL;
    END IF;
    DELETE FROM event_counts WHERE events <= 0;
    DELETE FROM event_actor_counts WHERE events <= 0;
    -- Only the columns the rollups need: the payload stays on disk.
    batch := ARRAY(
        SELECT ROW(e.id, e.swarm_id, e.agent_id, e.type, NULL, e."timestamp", NULL, NULL, e.entity_type,
                   e.severity, e.seq, e.tx_id)::events
        FROM events e, (SELECT coalesce(max(p.tx_id), '0') AS tx_id, coalesce(max(p.seq), 0) AS seq
                        FROM event_rollup_position p) AS p
        WHERE (e.tx_id, e.seq) > (p.tx_id, p.seq)
          AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY e.tx_id, e.seq
        LIMIT max_rows);
    IF cardinality(batch) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM dash_event_rollups_add(batch, true, true);
    last_tx := batch[cardinality(batch)].tx_id;
    last_seq := batch[cardinality(batch)].seq;
    INSERT INTO event_rollup_position AS p (singleton, tx_id, seq) VALUES (true, last_tx, last_seq)
    ON CONFLICT (singleton) DO UPDATE SET tx_id = excluded.tx_id, seq = excluded.seq, updated_at = now();
    RETURN cardinality(batch);
END
$$;

-- After a DELETE or UPDATE of events (a swarm's cascade, an agent's SET NULL, or by hand): the
-- changed rows that the rollups hold are taken out of them, and an UPDATE's new rows put in. An
-- UPDATE that keeps time, type and severity (clearing agent_id) only changes the actor counts.
CREATE FUNCTION dash_event_rollups_forget() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pos_tx xid8;
    pos_seq bigint;
    removed events[];
    added events[];
BEGIN
    PERFORM pg_advisory_xact_lock(4410, 2);
    SELECT coalesce(max(p.tx_id), '0'), coalesce(max(p.seq), 0) INTO pos_tx, pos_seq
    FROM event_rollup_position p;
    IF TG_OP = 'DELETE' THEN
        -- Straight from the transition table (a swarm's cascade can delete millions of rows).
        UPDATE event_counts c SET events = c.events - g.n
        FROM (
            SELECT s.span, date_bin(make_interval(secs => s.span), o."timestamp", timestamptz '1970-01-01 00:00:00+00') AS bucket,
                   o.type, o.severity, count(*) AS n
            FROM old_rows o CROSS JOIN (VALUES (60), (3600)) AS s(span)
            WHERE (o.tx_id, o.seq) <= (pos_tx, pos_seq)
            GROUP BY 1, 2, 3, 4
        ) g
        WHERE c.span_seconds = g.span AND c.bucket = g.bucket AND c.type = g.type AND c.severity = g.severity;
        UPDATE event_actor_counts c SET events = c.events - g.n
        FROM (
            SELECT s.span, date_bin(make_interval(secs => s.span), o."timestamp", timestamptz '1970-01-01 00:00:00+00') AS bucket,
                   o.type, o.swarm_id, coalesce(o.agent_id, '00000000-0000-0000-0000-000000000000') AS agent_id,
                   count(*) AS n
            FROM old_rows o CROSS JOIN (VALUES (60), (3600)) AS s(span)
            WHERE (o.tx_id, o.seq) <= (pos_tx, pos_seq)
            GROUP BY 1, 2, 3, 4, 5
        ) g
        WHERE c.span_seconds = g.span AND c.bucket = g.bucket AND c.type = g.type
          AND c.swarm_id = g.swarm_id AND c.agent_id = g.agent_id;
        RETURN NULL;
    END IF;
    removed := ARRAY(SELECT o FROM old_rows o WHERE (o.tx_id, o.seq) <= (pos_tx, pos_seq));
    added := ARRAY(SELECT n FROM new_rows n WHERE (n.tx_id, n.seq) <= (pos_tx, pos_seq));
    PERFORM dash_event_rollups_remove(removed, false, true);
    PERFORM dash_event_rollups_add(added, false, true);
    -- The counts: only rows whose time, type or severity changed.
    PERFORM dash_event_rollups_remove(ARRAY(
        SELECT o FROM unnest(removed) AS o
        WHERE NOT EXISTS (SELECT 1 FROM unnest(added) AS n
                          WHERE n.seq = o.seq AND n.id = o.id AND n."timestamp" = o."timestamp"
                            AND n.type = o.type AND n.severity = o.severity)), true, false);
    PERFORM dash_event_rollups_add(ARRAY(
        SELECT n FROM unnest(added) AS n
        WHERE NOT EXISTS (SELECT 1 FROM unnest(removed) AS o
                          WHERE n.seq = o.seq AND n.id = o.id AND n."timestamp" = o."timestamp"
                            AND n.type = o.type AND n.severity = o.severity)), true, false);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_rollups_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dash_event_rollups_forget();

CREATE TRIGGER events_rollups_update AFTER UPDATE ON events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dash_event_rollups_forget();

CREATE FUNCTION dash_event_rollups_clear() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(4410, 2);
    DELETE FROM event_counts;
    DELETE FROM event_actor_counts;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_rollups_truncate AFTER TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION dash_event_rollups_clear();

-- The window [since, +infinity) as the rollups cut it: m1 and h1 are the first whole minute and
-- the first whole hour at or after since; (tx_id, seq) is where the rollups have got to.
CREATE FUNCTION dash_event_window(since timestamptz)
RETURNS TABLE (t0 timestamptz, m1 timestamptz, h1 timestamptz, tx_id xid8, seq bigint)
LANGUAGE sql STABLE AS $$
    SELECT since,
           date_bin('1 minute', since - interval '1 microsecond', timestamptz '1970-01-01 00:00:00+00')
               + interval '1 minute',
           date_bin('1 hour', since - interval '1 microsecond', timestamptz '1970-01-01 00:00:00+00')
               + interval '1 hour',
           coalesce(max(p.tx_id), '0'), coalesce(max(p.seq), 0)
    FROM event_rollup_position p
$$;

-- Events at or after `since` by type and severity (several rows per pair; the caller adds them
-- up): the hourly rows of the whole hours, the minute rows of the whole minutes before them, the
-- raw events of the first partial minute that the rollups hold, and the raw events they do not
-- hold yet. Exact, and it reads at most a minute of events raw plus what the rollups have not
-- reached. A plpgsql function so that it can turn JIT compilation off: the planner cannot know
-- how few raw rows it will read, and would otherwise spend longer compiling than counting.
CREATE FUNCTION dash_event_counts(since timestamptz)
RETURNS TABLE (type text, severity text, events bigint)
LANGUAGE plpgsql STABLE
SET jit = off
AS $$
BEGIN
    RETURN QUERY
    WITH w AS (SELECT * FROM dash_event_window(since))
    SELECT c.type, c.severity, c.events
    FROM event_counts c, w WHERE c.span_seconds = 3600 AND c.bucket >= w.h1 AND c.events > 0
    UNION ALL
    SELECT c.type, c.severity, c.events
    FROM event_counts c, w
    WHERE c.span_seconds = 60 AND c.bucket >= w.m1 AND c.bucket < w.h1 AND c.events > 0
    UNION ALL
    SELECT e.type, e.severity, count(*)
    FROM events e, w
    WHERE e."timestamp" >= w.t0 AND e."timestamp" < w.m1 AND (e.tx_id, e.seq) <= (w.tx_id, w.seq)
    GROUP BY e.type, e.severity
    UNION ALL
    SELECT e.type, e.severity, count(*)
    FROM events e, w
    WHERE (e.tx_id, e.seq) > (w.tx_id, w.seq) AND e."timestamp" >= w.t0
    GROUP BY e.type, e.severity;
END
$$;

-- Events at or after `since` by type: count, distinct agents, distinct swarms, first and last
-- timestamp; from the rollups and the raw events they do not hold, as dash_event_counts.
CREATE FUNCTION dash_event_type_stats(since timestamptz)
RETURNS TABLE (event_type text, event_count bigint, unique_agents bigint, unique_swarms bigint,
               first_event timestamptz, last_event timestamptz)
LANGUAGE plpgsql STABLE
SET jit = off
AS $$
BEGIN
    RETURN QUERY
    WITH w AS (SELECT * FROM dash_event_window(since)),
    counts AS (
        SELECT c.type, sum(c.events)::bigint AS events FROM dash_event_counts(since) c GROUP BY c.type
    ), actors AS (
        SELECT a.type, a.swarm_id, nullif(a.agent_id, '00000000-0000-0000-0000-000000000000') AS agent_id
        FROM event_actor_counts a, w WHERE a.span_seconds = 3600 AND a.bucket >= w.h1 AND a.events > 0
        UNION ALL
        SELECT a.type, a.swarm_id, nullif(a.agent_id, '00000000-0000-0000-0000-000000000000')
        FROM event_actor_counts a, w
        WHERE a.span_seconds = 60 AND a.bucket >= w.m1 AND a.bucket < w.h1 AND a.events > 0
        UNION ALL
        SELECT e.type, e.swarm_id, e.agent_id
        FROM events e, w
        WHERE e."timestamp" >= w.t0 AND e."timestamp" < w.m1 AND (e.tx_id, e.seq) <= (w.tx_id, w.seq)
        UNION ALL
        SELECT e.type, e.swarm_id, e.agent_id
        FROM events e, w
        WHERE (e.tx_id, e.seq) > (w.tx_id, w.seq) AND e."timestamp" >= w.t0
    ), distinct_actors AS (
        SELECT a.type, count(DISTINCT a.agent_id) AS agents, count(DISTINCT a.swarm_id) AS swarms
        FROM actors a GROUP BY a.type
    ), bounds AS (
        -- the partial first minute and the events not rolled up yet, raw
        SELECT e.type, min(e."timestamp") AS lo, max(e."timestamp") AS hi
        FROM events e, w WHERE e."timestamp" >= w.t0 AND e."timestamp" < w.m1 GROUP BY e.type
        UNION ALL
        SELECT e.type, min(e."timestamp"), max(e."timestamp")
        FROM events e, w WHERE (e.tx_id, e.seq) > (w.tx_id, w.seq) AND e."timestamp" >= w.t0
        GROUP BY e.type
        UNION ALL
        -- the rest: the first and last minute with events of the type, then that minute's events
        SELECT c.type,
               (SELECT e."timestamp" FROM events e
                WHERE e."timestamp" >= f.bucket AND e."timestamp" < f.bucket + interval '1 minute'
                  AND e.type = c.type
                ORDER BY e."timestamp" LIMIT 1),
               (SELECT e."timestamp" FROM events e
                WHERE e."timestamp" >= l.bucket AND e."timestamp" < l.bucket + interval '1 minute'
                  AND e.type = c.type
                ORDER BY e."timestamp" DESC LIMIT 1)
        FROM counts c, w,
             LATERAL (SELECT m.bucket FROM event_counts m
                      WHERE m.span_seconds = 60 AND m.type = c.type AND m.bucket >= w.m1 AND m.events > 0
                      ORDER BY m.bucket LIMIT 1) f,
             LATERAL (SELECT m.bucket FROM event_counts m
                      WHERE m.span_seconds = 60 AND m.type = c.type AND m.bucket >= w.m1 AND m.events > 0
                      ORDER BY m.bucket DESC LIMIT 1) l
    ), bounds_by_type AS (
        SELECT b.type, min(b.lo) AS lo, max(b.hi) AS hi FROM bounds b GROUP BY b.type
    )
    SELECT c.type, c.events, d.agents, d.swarms, b.lo, b.hi
    FROM counts c
    JOIN distinct_actors d ON d.type = c.type
    JOIN bounds_by_type b ON b.type = c.type
    WHERE c.events > 0;
END
$$;

-- The events of the last 24 hours by type (dash_event_type_stats): exact, from the rollups.
CREATE VIEW event_stats_24h AS
SELECT event_type, event_count, unique_agents, unique_swarms, first_event, last_event
FROM dash_event_type_stats(now() - interval '24 hours');

-- Roll up the events that exist now.
SELECT dash_event_rollups_refresh(2147483647, true);

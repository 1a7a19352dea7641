-- dash-storage: the documented schema, in one file.
--
-- This is the schema that replaying every file in migrations/versions/ produces; a test builds
-- one database from this file and one from the migrations and requires identical catalogs.
-- Keep it in step: when you add a migration, apply the same change here.
--
-- Migration bookkeeping (the runner creates this table itself before applying migrations):
-- one row per applied file; checksum = hex SHA-256 of the file's bytes.
CREATE TABLE _migrations (
    id         SERIAL      PRIMARY KEY,
    name       TEXT        NOT NULL UNIQUE,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    checksum   TEXT        NOT NULL
);

-- ===== from 20260101000000_initial_schema.sql =================================================

-- Dash storage, first schema: swarms, agents, events, sessions, budgets, budget_ledger and the
-- three reporting views. The runner wraps this file in one transaction and creates _migrations
-- itself. Needs PostgreSQL 13+ (gen_random_uuid() and min_scale() are built in).
--
-- Money: unconstrained NUMERIC plus a CHECK, not NUMERIC(p,s). A typmod such as NUMERIC(24,10)
-- silently ROUNDS a finer value on the way in (also inside `consumed = consumed + $1`), so a
-- charge of 0.00000000001 would be stored as 0 and an agent could spend forever for free. The
-- CHECK below keeps the same limits as NUMERIC(24,10) -- at most 10 decimal places (per-token
-- prices such as $0.015 per million tokens = 1.5e-8 need 9) and below 10^14 -- but REJECTS a
-- value that does not fit instead of rounding it. The upper bound also rejects 'NaN' and
-- 'Infinity', which would otherwise pass `consumed <= allocated` (NaN sorts above everything).
-- min_scale() ignores trailing zeros, so 1.500000000000 is accepted.

CREATE FUNCTION dash_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- swarms
-- ---------------------------------------------------------------------------------------------
CREATE TABLE swarms (
    id           UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    name         TEXT        NOT NULL,
    config       JSONB       NOT NULL DEFAULT '{}',
    status       TEXT        NOT NULL DEFAULT 'creating',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ,
    CONSTRAINT swarms_status_check CHECK (status IN
        ('creating', 'active', 'scaling', 'paused', 'completed', 'failed', 'destroyed'))
);

-- why: SwarmRepository.find_by_name (names are not unique, so a plain btree).
CREATE INDEX swarms_name_idx ON swarms (name);
-- No index on status: a handful of values over a small table; list(status=...) scans cheaply.

CREATE TRIGGER swarms_set_updated_at BEFORE UPDATE ON swarms
    FOR EACH ROW EXECUTE FUNCTION dash_set_updated_at();

-- ---------------------------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------------------------
CREATE TABLE agents (
    id                UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    swarm_id          UUID        NOT NULL REFERENCES swarms (id) ON DELETE CASCADE,
    label             TEXT,
    status            TEXT        NOT NULL DEFAULT 'pending',
    lifecycle_state   TEXT        NOT NULL DEFAULT 'initializing',
    model             TEXT,
    task              TEXT,
    config            JSONB       NOT NULL DEFAULT '{}',
    context           JSONB,
    code              JSONB,
    reasoning         JSONB,
    safety_boundaries JSONB,
    spawned_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at      TIMESTAMPTZ,
    pause_time        TIMESTAMPTZ,
    paused_by         TEXT,
    runtime           BIGINT      NOT NULL DEFAULT 0,   -- milliseconds
    retry_count       INTEGER     NOT NULL DEFAULT 0,
    max_retries       INTEGER     NOT NULL DEFAULT 3,
    last_error        TEXT,
    budget_limit      NUMERIC,                          -- NULL = no per-agent limit; 0 is a limit
    metadata          JSONB       NOT NULL DEFAULT '{}',
    CONSTRAINT agents_status_check CHECK (status IN
        ('pending', 'running', 'paused', 'completed', 'failed', 'blocked', 'killed')),
    CONSTRAINT agents_lifecycle_state_check CHECK (lifecycle_state IN
        ('initializing', 'spawning', 'running', 'pausing', 'paused', 'resuming', 'completing',
         'failed', 'cleaning_up', 'destroyed')),
    CONSTRAINT agents_runtime_check CHECK (runtime >= 0),
    CONSTRAINT agents_retry_count_check CHECK (retry_count >= 0),
    CONSTRAINT agents_max_retries_check CHECK (max_retries >= 0),
    CONSTRAINT agents_budget_limit_check CHECK (budget_limit >= 0),
    CONSTRAINT agents_budget_limit_precision_check CHECK
        (budget_limit < 1e14 AND min_scale(budget_limit) <= 10),
    -- metadata is merged with `||` (merge_metadata); that is only a merge for objects.
    CONSTRAINT agents_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);

-- why: AgentRepository.find_by_swarm_id / delete_by_swarm_id / list(swarm_id=...), the
-- swarm_summary per-swarm count, and the ON DELETE CASCADE lookup when a swarm is deleted.
CREATE INDEX agents_swarm_id_idx ON agents (swarm_id);
-- No index on status / lifecycle_state: get_counts_by_status reads every row anyway, and the
-- per-swarm filters ride on agents_swarm_id_idx; a low-cardinality index would only slow writes.

CREATE TRIGGER agents_set_updated_at BEFORE UPDATE ON agents
    FOR EACH ROW EXECUTE FUNCTION dash_set_updated_at();

-- ---------------------------------------------------------------------------------------------
-- events (append-only log; every index here costs ingest speed)
-- ---------------------------------------------------------------------------------------------
CREATE TABLE events (
    id              UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    swarm_id        UUID        NOT NULL REFERENCES swarms (id) ON DELETE CASCADE,
    agent_id        UUID        REFERENCES agents (id) ON DELETE SET NULL,
    type            TEXT        NOT NULL,
    payload         JSONB       NOT NULL DEFAULT '{}',
    timestamp       TIMESTAMPTZ NOT NULL DEFAULT now(),
    correlation_id  TEXT,
    -- Deliberately no foreign key: the log is append-only and ingest must stay one cheap insert
    -- (no parent lookup / lock per row, batches in any order, parents may be pruned by
    -- delete_older_than while children remain).
    parent_event_id UUID,
    entity_type     TEXT        NOT NULL DEFAULT 'system',
    severity        TEXT        NOT NULL DEFAULT 'info',
    CONSTRAINT events_entity_type_check CHECK (entity_type IN ('agent', 'task', 'system')),
    CONSTRAINT events_severity_check CHECK (severity IN
        ('debug', 'info', 'warning', 'error', 'critical'))
);

-- why: EventRepository.find_by_filter(swarm_id, types, since/until, cursor on (timestamp, id)),
-- find_by_swarm_id and get_timeline: equality on swarm_id then an ordered range on
-- (timestamp, id), so keyset paging is a plain index range scan. Also serves the ON DELETE
-- CASCADE lookup when a swarm is deleted.
CREATE INDEX events_swarm_id_timestamp_idx ON events (swarm_id, timestamp, id);

-- why: EventRepository.find_by_agent_id (ordered by time) and find_by_filter(agent_id=...);
-- also the ON DELETE SET NULL lookup when an agent is deleted (agent_id = $1 implies NOT NULL,
-- so the partial index qualifies). Partial: system events without an agent cost nothing here.
CREATE INDEX events_agent_id_timestamp_idx ON events (agent_id, timestamp, id)
    WHERE agent_id IS NOT NULL;

-- why: get_stats(hours), event_stats_24h and delete_older_than select by time across all swarms;
-- find_by_filter without swarm/agent pages by (timestamp, id). Btree, not BRIN: BRIN relies on
-- physical order matching time, which caller-given timestamps (imports, backfills) break; it
-- cannot return rows in order (global keyset paging, oldest-first delete batches); and after
-- each delete batch its ranges still match, so every following batch rescans the dead rows,
-- while btree marks them dead and skips them. Inserts are near-monotonic in time, so they
-- append to the rightmost leaf and stay cheap.
CREATE INDEX events_timestamp_idx ON events (timestamp, id);

-- ---------------------------------------------------------------------------------------------
-- sessions
-- ---------------------------------------------------------------------------------------------
CREATE TABLE sessions (
    id             UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    tree_data      JSONB       NOT NULL DEFAULT '{}',
    current_branch TEXT,
    metadata       JSONB       NOT NULL DEFAULT '{}',
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at     TIMESTAMPTZ,                         -- NULL = never expires
    -- metadata is merged with `||` (merge_metadata); that is only a merge for objects.
    CONSTRAINT sessions_metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);

-- why: SessionRepository.cleanup_expired (expires_at <= now()). Partial: sessions that never
-- expire are never candidates and need no entry.
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at) WHERE expires_at IS NOT NULL;

-- why: SessionRepository.find_by_branch; without it every lookup scans all sessions, which
-- pile up until cleanup_expired runs.
CREATE INDEX sessions_current_branch_idx ON sessions (current_branch);

CREATE TRIGGER sessions_set_updated_at BEFORE UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION dash_set_updated_at();

-- ---------------------------------------------------------------------------------------------
-- budgets
-- ---------------------------------------------------------------------------------------------
CREATE TABLE budgets (
    id          UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- NULL only for budgets that belong to no swarm (e.g. a project budget).
    swarm_id    UUID        REFERENCES swarms (id) ON DELETE CASCADE,
    scope_type  TEXT        NOT NULL,
    scope_id    UUID        NOT NULL,
    allocated   NUMERIC     NOT NULL DEFAULT 0,
    consumed    NUMERIC     NOT NULL DEFAULT 0,
    currency    TEXT        NOT NULL DEFAULT 'USD',
    max_tokens  BIGINT,                                 -- NULL = unlimited; 0 means zero tokens
    used_tokens BIGINT      NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT budgets_scope_type_check CHECK (scope_type IN ('swarm', 'agent', 'project')),
    CONSTRAINT budgets_currency_check CHECK (currency IN ('USD', 'EUR', 'GBP', 'CAD')),
    CONSTRAINT budgets_allocated_check CHECK (allocated >= 0),
    CONSTRAINT budgets_consumed_check CHECK (consumed >= 0),
    CONSTRAINT budgets_consumed_within_allocated_check CHECK (consumed <= allocated),
    CONSTRAINT budgets_money_precision_check CHECK
        (allocated < 1e14 AND min_scale(allocated) <= 10
         AND consumed < 1e14 AND min_scale(consumed) <= 10),
    CONSTRAINT budgets_used_tokens_check CHECK (used_tokens >= 0),
    CONSTRAINT budgets_max_tokens_check CHECK (max_tokens IS NULL OR max_tokens >= 0),
    CONSTRAINT budgets_used_tokens_within_max_check CHECK
        (max_tokens IS NULL OR used_tokens <= max_tokens),
    -- A swarm-scope budget is the budget OF its swarm: it must cascade with it and be what
    -- swarm_summary finds.
    CONSTRAINT budgets_swarm_scope_check CHECK (scope_type <> 'swarm' OR scope_id = swarm_id),
    -- why (index): BudgetRepository.find_by_scope / get_usage_by_scope and swarm_summary's
    -- swarm-scope lookup; also guarantees at most one budget per scope.
    CONSTRAINT budgets_scope_unique UNIQUE (scope_type, scope_id)
);

-- why: BudgetRepository.find_by_swarm_id / get_swarm_budget_summary, and the ON DELETE CASCADE
-- lookup when a swarm is deleted.
CREATE INDEX budgets_swarm_id_idx ON budgets (swarm_id);

CREATE TRIGGER budgets_set_updated_at BEFORE UPDATE ON budgets
    FOR EACH ROW EXECUTE FUNCTION dash_set_updated_at();

-- ---------------------------------------------------------------------------------------------
-- budget_ledger: one row per accepted consumption; makes a retried consume charge once
-- ---------------------------------------------------------------------------------------------
CREATE TABLE budget_ledger (
    id              UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    budget_id       UUID        NOT NULL REFERENCES budgets (id) ON DELETE CASCADE,
    tokens          BIGINT      NOT NULL DEFAULT 0,
    cost            NUMERIC     NOT NULL DEFAULT 0,
    idempotency_key TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT budget_ledger_tokens_check CHECK (tokens >= 0),
    CONSTRAINT budget_ledger_cost_check CHECK (cost >= 0),
    CONSTRAINT budget_ledger_cost_precision_check CHECK (cost < 1e14 AND min_scale(cost) <= 10),
    -- why (index): the idempotency lookup/ON CONFLICT of consume_budget, and (leading budget_id)
    -- the ON DELETE CASCADE lookup when a budget is deleted. No other index needed.
    CONSTRAINT budget_ledger_idempotency_unique UNIQUE (budget_id, idempotency_key)
);

-- ---------------------------------------------------------------------------------------------
-- views
-- ---------------------------------------------------------------------------------------------

-- One row per swarm, always. Agents are aggregated in a LATERAL subquery (exactly one row per
-- swarm) and the budget joined on the unique (scope_type, scope_id), so no join can multiply
-- rows. (budget_percentage is redefined by 20261130163000_budget_percentage, below.)
CREATE VIEW swarm_summary AS
SELECT
    s.id,
    s.name,
    s.status,
    s.created_at,
    a.running_agents,
    a.total_agents,
    COALESCE(b.allocated, 0) AS budget_allocated,
    COALESCE(b.consumed, 0)  AS budget_consumed,
    CASE
        WHEN COALESCE(b.allocated, 0) = 0 THEN 0::numeric
        ELSE round(b.consumed * 100 / b.allocated, 2)
    END AS budget_percentage
FROM swarms s
CROSS JOIN LATERAL (
    SELECT
        count(*) FILTER (WHERE ag.status = 'running') AS running_agents,
        count(*)                                      AS total_agents
    FROM agents ag
    WHERE ag.swarm_id = s.id
) a
LEFT JOIN budgets b
    ON b.scope_type = 'swarm' AND b.scope_id = s.id;

CREATE VIEW agent_activity AS
SELECT
    ag.id,
    ag.swarm_id,
    s.name AS swarm_name,
    ag.label,
    ag.status,
    ag.lifecycle_state,
    ag.model,
    ag.spawned_at,
    ag.completed_at,
    EXTRACT(EPOCH FROM COALESCE(ag.completed_at, now()) - ag.spawned_at) AS duration_seconds,
    ag.retry_count,
    ag.runtime
FROM agents ag
JOIN swarms s ON s.id = ag.swarm_id;

CREATE VIEW event_stats_24h AS
SELECT
    e.type                     AS event_type,
    count(*)                   AS event_count,
    count(DISTINCT e.agent_id) AS unique_agents,
    count(DISTINCT e.swarm_id) AS unique_swarms,
    min(e.timestamp)           AS first_event,
    max(e.timestamp)           AS last_event
FROM events e
WHERE e.timestamp >= now() - interval '24 hours'
GROUP BY e.type;

-- ===== from 20261130163000_budget_percentage.sql ==============================================

-- One definition of "percent of a budget used", shared by the views and BudgetRepository
-- (budgets.percent_used computes the same in Python; the tests compare the two):
--   * part / whole * 100, rounded DOWN to 2 decimals and computed exactly (div() truncates the
--     exact quotient), so it reads 100.00 exactly when no headroom is left and never rounds
--     99.999 % up to a "full" 100.00 while a charge could still pass;
--   * a whole of 0 reads 100.00: a zero allocation has no headroom at all, so it is fully used
--     (and "exceeded": consumed >= allocated), like an allocation spent to the last cent;
--   * NULL in, NULL out.
-- LANGUAGE sql and not STRICT, so that the planner can inline it into the views.
CREATE FUNCTION dash_budget_percentage(part numeric, whole numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN whole = 0 THEN 100.00 ELSE div(part * 10000, whole) * 0.01 END
$$;

-- swarm_summary computes budget_percentage with that function. A swarm without a swarm-scope
-- budget has no percentage (NULL): it is neither "0 % used" nor, like a zero allocation, "100 %
-- used". Its budget_allocated / budget_consumed stay 0, as before. Otherwise unchanged: one row
-- per swarm, agents aggregated in a LATERAL subquery, the budget joined on the unique
-- (scope_type, scope_id).
CREATE OR REPLACE VIEW swarm_summary AS
SELECT
    s.id,
    s.name,
    s.status,
    s.created_at,
    a.running_agents,
    a.total_agents,
    COALESCE(b.allocated, 0) AS budget_allocated,
    COALESCE(b.consumed, 0)  AS budget_consumed,
    dash_budget_percentage(b.consumed, b.allocated) AS budget_percentage
FROM swarms s
CROSS JOIN LATERAL (
    SELECT
        count(*) FILTER (WHERE ag.status = 'running') AS running_agents,
        count(*)                                      AS total_agents
    FROM agents ag
    WHERE ag.swarm_id = s.id
) a
LEFT JOIN budgets b
    ON b.scope_type = 'swarm' AND b.scope_id = s.id;

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

-- ===== from 20261130175500_ledger_lookup.sql ==================================================
-- The idempotency look-up of the consume statements, as a function whose plan is the unique index
-- (budget_id, idempotency_key) whatever the statistics say. A prepared statement that reads
-- budget_ledger directly is planned once for a ledger that may be empty (a new database, freshly
-- analysed), where a sequential scan looks cheapest, and that cached plan is then kept while the
-- ledger grows to millions of rows. Inside this function sequential scans are off, and each key
-- is looked up on its own by equality on both columns of the index (LIMIT 1 keeps the lateral
-- subquery from being flattened into a join, and = ANY is avoided: the planner may use it as a
-- mere filter over every row of the budget), so the only plan left is one index descent per key,
-- from the first call on. plpgsql keeps the plan per session.
CREATE FUNCTION dash_ledger_entries(budget uuid, keys text[])
RETURNS TABLE (idempotency_key text, id uuid, tokens bigint, cost numeric)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
AS $$
BEGIN
    RETURN QUERY
    SELECT k.key, e.id, e.tokens, e.cost
    FROM unnest(keys) AS k(key)
    CROSS JOIN LATERAL (
        SELECT l.id, l.tokens, l.cost FROM budget_ledger l
        WHERE l.budget_id = budget AND l.idempotency_key = k.key LIMIT 1
    ) e;
END
$$;

-- ===== from 20261130190500_event_partitions.sql ==============================================
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
-- (The migration converts an existing table, copying every row with its stream position and
-- checking count and content checksum; a new database simply starts with the partitioned table.)

-- event_stats_24h reads events; it is rebuilt over the hourly rollups by the next migration.
DROP VIEW event_stats_24h;

DROP TABLE events;

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

-- Partitions for yesterday to a week ahead.
SELECT dash_event_partitions_ensure(ARRAY(
    SELECT generate_series(now() - interval '1 day', now() + interval '7 days', interval '1 day')),
    interval '1 day');

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

-- ===== from 20261130190600_event_rollups.sql =================================================
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

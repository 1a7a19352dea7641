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

-- Agents, their state transitions and the agent_activity view (repositories/agents.py and
-- agent_transitions.py).
--
-- Every statement that hands back agents returns the columns of core.models.Agent in its field
-- order (id, swarm_id, label, ..., metadata); the activity reads return those of
-- core.models.AgentActivity. The statement registry test checks both against the server.
-- Names starting with part_ are fragments, not statements: see part_list.

-- name: insert
-- Idempotent create; a final initial status ($16, the final statuses) stamps completed_at, a
-- paused one pause_time. A foreign-key violation means the swarm is missing.
INSERT INTO agents (id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
                    reasoning, safety_boundaries, max_retries, budget_limit, metadata, completed_at,
                    pause_time)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
        CASE WHEN $4 = ANY($16::text[]) THEN now() END, CASE WHEN $4 = 'paused' THEN now() END)
ON CONFLICT (id) DO NOTHING
RETURNING id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
          reasoning, safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by,
          runtime, retry_count, max_retries, last_error, budget_limit, metadata;

-- name: find_by_id
-- One agent by primary key.
SELECT id, swarm_id, label, status, lifecycle_state, model, task, config, context, code, reasoning,
       safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by, runtime,
       retry_count, max_retries, last_error, budget_limit, metadata
FROM agents WHERE id = $1;

-- name: find_by_swarm
-- Agents of one swarm in spawn order (oldest first, ties by id).
SELECT id, swarm_id, label, status, lifecycle_state, model, task, config, context, code, reasoning,
       safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by, runtime,
       retry_count, max_retries, last_error, budget_limit, metadata
FROM agents WHERE swarm_id = $1
ORDER BY spawned_at ASC, id ASC LIMIT $2 OFFSET $3;

-- name: part_list
-- The reads of list() are composed from this start and the part_ fragments after it (see
-- ListReads in repositories/base.py): of every agent (list_by_*), of those matching the optional
-- filters (list_where_by_*: part_filters, at least one given), and of one swarm with the same
-- optional filters (list_in_swarm_by_*: part_in_swarm and part_filters), one statement per order
-- column and direction, each listed by statements() of repositories/agents.py; $1 is the limit,
-- $2 the offset.
SELECT id, swarm_id, label, status, lifecycle_state, model, task, config, context, code, reasoning,
       safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by, runtime,
       retry_count, max_retries, last_error, budget_limit, metadata
FROM agents

-- name: part_in_swarm
-- One swarm $6, found through agents_swarm_id_idx, so the optional filters are tested on that
-- swarm's rows only.
swarm_id = $6

-- name: part_filters
-- $3 status, $4 lifecycle state and $5 model, each NULL = any.
($3::text IS NULL OR status = $3)
  AND ($4::text IS NULL OR lifecycle_state = $4)
  AND ($5::text IS NULL OR model = $5)

-- name: count_all
-- Number of agents (no filter: the server may count from the smallest index).
SELECT count(*) FROM agents;

-- name: part_count
-- The counts matching the optional filters of list() are composed from this start and the same
-- fragments, numbered from $1 (no page): count_where ($1 status, $2 lifecycle state, $3 model, at
-- least one given, else count_all) and count_in_swarm_where (the same within swarm $4, found
-- through agents_swarm_id_idx).
SELECT count(*) FROM agents

-- name: count_of_swarm
-- Number of agents of one swarm, through agents_swarm_id_idx.
SELECT count(*) FROM agents WHERE swarm_id = $1;

-- name: count_by_status
-- Agents per status, all swarms.
SELECT status, count(*) FROM agents GROUP BY status;

-- name: count_by_status_in_swarm
-- Agents per status in one swarm.
SELECT status, count(*) FROM agents WHERE swarm_id = $1 GROUP BY status;

-- name: update
-- Set the fields given, keep the others: each field has a flag (is it given?) and a value, so
-- one statement serves every combination. $1 id, then flag/value pairs: $2/$3 label,
-- $4/$5 model, $6/$7 task, $8/$9 config, $10/$11 context, $12/$13 code, $14/$15 reasoning,
-- $16/$17 safety_boundaries, $18/$19 max_retries, $20/$21 budget_limit, $22/$23 metadata,
-- $24/$25 last_error, $26/$27 runtime (a NULL value given sets NULL).
UPDATE agents SET
    label = CASE WHEN $2::boolean THEN $3::text ELSE label END,
    model = CASE WHEN $4::boolean THEN $5::text ELSE model END,
    task = CASE WHEN $6::boolean THEN $7::text ELSE task END,
    config = CASE WHEN $8::boolean THEN $9::jsonb ELSE config END,
    context = CASE WHEN $10::boolean THEN $11::jsonb ELSE context END,
    code = CASE WHEN $12::boolean THEN $13::jsonb ELSE code END,
    reasoning = CASE WHEN $14::boolean THEN $15::jsonb ELSE reasoning END,
    safety_boundaries = CASE WHEN $16::boolean THEN $17::jsonb ELSE safety_boundaries END,
    max_retries = CASE WHEN $18::boolean THEN $19::integer ELSE max_retries END,
    budget_limit = CASE WHEN $20::boolean THEN $21::numeric ELSE budget_limit END,
    metadata = CASE WHEN $22::boolean THEN $23::jsonb ELSE metadata END,
    last_error = CASE WHEN $24::boolean THEN $25::text ELSE last_error END,
    runtime = CASE WHEN $26::boolean THEN $27::bigint ELSE runtime END
WHERE id = $1
RETURNING id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
          reasoning, safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by,
          runtime, retry_count, max_retries, last_error, budget_limit, metadata;

-- name: transition
-- Every guarded state change (update_status, update_lifecycle_state, pause, resume) in one
-- statement: one UPDATE whose WHERE is the guard (the current state is an allowed source), so a
-- change takes the row lock only when it applies, and after waiting for a concurrent change it is
-- judged on that one's result. When it does not apply, the row's state (as of this statement's
-- snapshot) tells "not allowed" from "missing". Always one row: cur_state (NULL when the change
-- applied or the agent is missing), then the agent's columns (NULL unless the change applied).
--   $1 agent; $2 whether the guard reads lifecycle_state (else status); $3 the allowed current
--   states; $4 the new status (NULL keeps it); $5 the final statuses, when completed_at follows
--   the new status (stamped once if it is one of them, else cleared; NULL leaves completed_at
--   alone); $6 the new lifecycle state (NULL keeps it); $7 whether to set last_error to $8;
--   $9 whether to set the pause marks: $10 is paused_by, and pause_time is now() with it, or
--   both are cleared when $10 is NULL.
WITH upd AS (
    UPDATE agents SET
        status = COALESCE($4::text, status),
        completed_at = CASE
            WHEN $5::text[] IS NULL THEN completed_at
            WHEN $4::text = ANY($5::text[]) THEN COALESCE(completed_at, now())
            ELSE NULL
        END,
        lifecycle_state = COALESCE($6::text, lifecycle_state),
        last_error = CASE WHEN $7::boolean THEN $8::text ELSE last_error END,
        pause_time = CASE WHEN NOT $9::boolean THEN pause_time WHEN $10::text IS NULL THEN NULL ELSE now() END,
        paused_by = CASE WHEN $9::boolean THEN $10::text ELSE paused_by END
    WHERE id = $1 AND (CASE WHEN $2::boolean THEN lifecycle_state ELSE status END) = ANY($3::text[])
    RETURNING id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
              reasoning, safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by,
              runtime, retry_count, max_retries, last_error, budget_limit, metadata
)
SELECT cur.cur_state, upd.*
FROM (SELECT 1) AS one
LEFT JOIN upd ON true
LEFT JOIN (
    SELECT CASE WHEN $2::boolean THEN lifecycle_state ELSE status END AS cur_state
    FROM agents WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM upd)
) cur ON true;

-- name: increment_retry
-- Relative write (never retried): one more retry.
UPDATE agents SET retry_count = retry_count + 1 WHERE id = $1
RETURNING id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
          reasoning, safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by,
          runtime, retry_count, max_retries, last_error, budget_limit, metadata;

-- name: increment_retry_if
-- Compare-and-set of the retry count, run inside a transaction: $2 = the count the caller read.
-- The CTE locks and reads the row, so one round trip tells "missing" (no row) from "changed
-- meanwhile" (cur_count <> $2, agent columns NULL). It also returns the transaction's id, known
-- before COMMIT is sent, so that a retry after a lost COMMIT answer can ask whether it committed.
WITH cur AS (
    SELECT id AS cur_id, retry_count AS cur_count FROM agents WHERE id = $1 FOR UPDATE
), upd AS (
    UPDATE agents SET retry_count = retry_count + 1
    FROM cur
    WHERE id = cur_id AND retry_count = $2
    RETURNING id, swarm_id, label, status, lifecycle_state, model, task, config, context, code,
              reasoning, safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by,
              runtime, retry_count, max_retries, last_error, budget_limit, metadata
)
SELECT cur_count, pg_current_xact_id()::text AS xact, upd.* FROM cur LEFT JOIN upd ON true;

-- name: lock
-- A retry of the compare-and-set, step 1: lock the agent. The earlier attempt's transaction held
-- this lock from its UPDATE to its end, so once it is ours that transaction has ended.
SELECT id, swarm_id, label, status, lifecycle_state, model, task, config, context, code, reasoning,
       safety_boundaries, spawned_at, updated_at, completed_at, pause_time, paused_by, runtime,
       retry_count, max_retries, last_error, budget_limit, metadata
FROM agents WHERE id = $1 FOR UPDATE;

-- name: xact_status
-- Step 2: did the earlier attempt's transaction commit ('committed' / 'aborted')?
SELECT pg_xact_status($1::text::xid8);

-- name: activity
-- agent_activity rows, newest spawn first: $1 limit, $2 offset.
SELECT id, swarm_id, swarm_name, label, status, lifecycle_state, model, spawned_at, completed_at,
       duration_seconds, retry_count, runtime
FROM agent_activity
ORDER BY spawned_at DESC, id DESC LIMIT $1 OFFSET $2;

-- name: activity_of_swarm
-- The agent_activity rows of one swarm ($3), through agents_swarm_id_idx.
SELECT id, swarm_id, swarm_name, label, status, lifecycle_state, model, spawned_at, completed_at,
       duration_seconds, retry_count, runtime
FROM agent_activity WHERE swarm_id = $3
ORDER BY spawned_at DESC, id DESC LIMIT $1 OFFSET $2;

-- name: activity_of_agent
-- The agent_activity row of one agent ($3; agent_activity names the agent's id "id"), if it is
-- in swarm $4 (NULL = any swarm).
SELECT id, swarm_id, swarm_name, label, status, lifecycle_state, model, spawned_at, completed_at,
       duration_seconds, retry_count, runtime
FROM agent_activity WHERE id = $3 AND ($4::uuid IS NULL OR swarm_id = $4)
ORDER BY spawned_at DESC, id DESC LIMIT $1 OFFSET $2;

-- name: delete
-- Delete one agent (its events keep agent_id NULL).
DELETE FROM agents WHERE id = $1 RETURNING 1;

-- name: delete_by_swarm
-- Delete every agent of a swarm.
DELETE FROM agents WHERE swarm_id = $1;

-- Swarms and the swarm_summary view (repositories/swarms.py).
--
-- Every statement that hands back swarms returns the columns of core.models.Swarm in its field
-- order (id, name, config, status, created_at, updated_at, completed_at); the summaries return
-- those of core.models.SwarmSummary. The statement registry test checks both against the server.
-- Names starting with part_ are fragments, not statements: see part_list.

-- name: insert
-- Idempotent create: a retried attempt finds its own row instead of inserting a second one.
INSERT INTO swarms (id, name, config, status) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING
RETURNING id, name, config, status, created_at, updated_at, completed_at;

-- name: find_by_id
-- One swarm by primary key.
SELECT id, name, config, status, created_at, updated_at, completed_at FROM swarms WHERE id = $1;

-- name: find_by_name
-- The most recently created swarm with a name (names are not unique; newest wins, ties by id).
SELECT id, name, config, status, created_at, updated_at, completed_at FROM swarms
WHERE name = $1
ORDER BY created_at DESC, id DESC LIMIT 1;

-- name: part_list
-- The reads of list() are composed from this start and the part_ fragments after it (see
-- ListReads in repositories/base.py): of every swarm (list_by_*), and of one status $3
-- (list_of_status_by_*), one statement per order column and direction, each listed by
-- statements() of repositories/swarms.py; $1 is the limit, $2 the offset.
SELECT id, name, config, status, created_at, updated_at, completed_at FROM swarms

-- name: part_of_status
status = $3

-- name: count
-- Number of swarms.
SELECT count(*) FROM swarms;

-- name: count_by_status
-- Number of swarms with one status.
SELECT count(*) FROM swarms WHERE status = $1;

-- name: exists
-- Whether a swarm exists.
SELECT EXISTS (SELECT 1 FROM swarms WHERE id = $1);

-- name: update
-- Set the fields given, keep the others: each field has a flag (is it given?) and a value, so
-- one statement serves every combination. $1 id; $2/$3 name, $4/$5 config, $6/$7 status,
-- $8/$9 completed_at (a NULL value given clears it).
UPDATE swarms SET
    name = CASE WHEN $2::boolean THEN $3::text ELSE name END,
    config = CASE WHEN $4::boolean THEN $5::jsonb ELSE config END,
    status = CASE WHEN $6::boolean THEN $7::text ELSE status END,
    completed_at = CASE WHEN $8::boolean THEN $9::timestamptz ELSE completed_at END
WHERE id = $1
RETURNING id, name, config, status, created_at, updated_at, completed_at;

-- name: update_status
-- Status change; completed_at is stamped once on reaching a final status ($3, the final
-- statuses), cleared when leaving them.
UPDATE swarms SET
    status = $2,
    completed_at = CASE WHEN $2 = ANY($3::text[]) THEN COALESCE(completed_at, now()) ELSE NULL END
WHERE id = $1
RETURNING id, name, config, status, created_at, updated_at, completed_at;

-- name: delete
-- Delete one swarm (agents, events and budgets cascade).
DELETE FROM swarms WHERE id = $1 RETURNING 1;

-- name: summary
-- One row of the swarm_summary view.
SELECT id, name, status, created_at, running_agents, total_agents, budget_allocated,
       budget_consumed, budget_percentage
FROM swarm_summary WHERE id = $1;

-- name: list_summaries
-- Rows of the swarm_summary view, newest swarm first.
SELECT id, name, status, created_at, running_agents, total_agents, budget_allocated,
       budget_consumed, budget_percentage
FROM swarm_summary
ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2;

-- name: list_summaries_by_status
-- Rows of the swarm_summary view with one status ($3), newest swarm first.
SELECT id, name, status, created_at, running_agents, total_agents, budget_allocated,
       budget_consumed, budget_percentage
FROM swarm_summary WHERE status = $3
ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2;

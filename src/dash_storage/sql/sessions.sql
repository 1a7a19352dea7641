-- Session trees with optional expiry (repositories/sessions.py).
--
-- Every statement that hands back sessions returns the columns of core.models.Session in its
-- field order (id, tree_data, current_branch, metadata, created_at, updated_at, expires_at); the
-- statement registry test checks that against the server. A session is live while expires_at is
-- NULL or later than the database clock's now(). Names starting with part_ are fragments, not
-- statements: see part_list.

-- name: insert
-- Idempotent create; expires_at is the given time ($5), else now() + ttl ($6 seconds), NULL when
-- neither is given.
INSERT INTO sessions (id, tree_data, current_branch, metadata, expires_at)
VALUES ($1, $2, $3, $4, COALESCE($5::timestamptz, now() + make_interval(secs => $6::double precision)))
ON CONFLICT (id) DO NOTHING
RETURNING id, tree_data, current_branch, metadata, created_at, updated_at, expires_at;

-- name: find_any
-- A session by id whatever its expiry (a retried create fetching the row it wrote).
SELECT id, tree_data, current_branch, metadata, created_at, updated_at, expires_at
FROM sessions WHERE id = $1;

-- name: find_by_id
-- A live (not expired) session by id.
SELECT id, tree_data, current_branch, metadata, created_at, updated_at, expires_at
FROM sessions
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now());

-- name: part_list
-- The reads of list() are composed from this start and the part_ fragments after it (see
-- ListReads in repositories/base.py): of live sessions (list_live_by_*) or of every session
-- (list_all_by_*), one statement per order column and direction, each listed by statements() of
-- repositories/sessions.py; $1 is the limit, $2 the offset.
SELECT id, tree_data, current_branch, metadata, created_at, updated_at, expires_at FROM sessions

-- name: part_live
-- Not expired (its OR is not in parentheses: it stands alone in the WHERE clause).
expires_at IS NULL OR expires_at > now()

-- name: count_live
-- Number of live sessions.
SELECT count(*) FROM sessions WHERE expires_at IS NULL OR expires_at > now();

-- name: count_all
-- Number of sessions including expired ones.
SELECT count(*) FROM sessions;

-- name: exists
-- Whether a live session exists.
SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1 AND (expires_at IS NULL OR expires_at > now()));

-- name: update
-- Set the fields given of a live session, keep the others: each field has a flag (is it given?)
-- and a value, so one statement serves every combination. $1 id; $2/$3 tree_data,
-- $4/$5 current_branch, $6/$7 metadata, $8/$9 expires_at (NULL values given clear them).
UPDATE sessions SET
    tree_data = CASE WHEN $2::boolean THEN $3::jsonb ELSE tree_data END,
    current_branch = CASE WHEN $4::boolean THEN $5::text ELSE current_branch END,
    metadata = CASE WHEN $6::boolean THEN $7::jsonb ELSE metadata END,
    expires_at = CASE WHEN $8::boolean THEN $9::timestamptz ELSE expires_at END
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING id, tree_data, current_branch, metadata, created_at, updated_at, expires_at;

-- name: update_tree_data
-- New tree; current_branch NULL leaves the branch as it is.
UPDATE sessions SET tree_data = $2, current_branch = COALESCE($3, current_branch)
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING id, tree_data, current_branch, metadata, created_at, updated_at, expires_at;

-- name: merge_metadata
-- Atomic shallow merge of top-level metadata keys, in the database.
UPDATE sessions SET metadata = metadata || $2::jsonb
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING id, tree_data, current_branch, metadata, created_at, updated_at, expires_at;

-- name: find_by_branch
-- Live sessions on a branch, most recently updated first (ties by id).
SELECT id, tree_data, current_branch, metadata, created_at, updated_at, expires_at
FROM sessions
WHERE current_branch = $1 AND (expires_at IS NULL OR expires_at > now())
ORDER BY updated_at DESC, id DESC LIMIT $2 OFFSET $3;

-- name: extend_expiration
-- Push expiry out by $2 seconds from the later of its current expiry and now.
UPDATE sessions
SET expires_at = greatest(COALESCE(expires_at, now()), now()) + make_interval(secs => $2::double precision)
WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
RETURNING id, tree_data, current_branch, metadata, created_at, updated_at, expires_at;

-- name: delete_expired
-- Delete every expired session.
DELETE FROM sessions WHERE expires_at <= now();

-- name: delete
-- Delete one session (expired or not).
DELETE FROM sessions WHERE id = $1 RETURNING 1;

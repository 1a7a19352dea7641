-- Budgets, their consumption ledger and the consume statements (repositories/budgets.py and
-- budget_batcher.py).
--
-- Every statement that hands back budgets returns the columns of core.models.Budget in its field
-- order (id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
-- used_tokens, created_at, updated_at); the statement registry test checks that against the
-- server. 9223372036854775807 is bigint's largest value: the token limit of an unlimited budget.
-- Names starting with part_ are fragments, not statements: see part_list.

-- name: insert
-- Idempotent create: a retried attempt finds its own row instead of inserting a second one.
INSERT INTO budgets (id, swarm_id, scope_type, scope_id, allocated, currency, max_tokens)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO NOTHING
RETURNING id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
          used_tokens, created_at, updated_at;

-- name: find_by_id
-- One budget by primary key.
SELECT id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens, used_tokens,
       created_at, updated_at
FROM budgets WHERE id = $1;

-- name: find_by_scope
-- The budget of one scope (unique).
SELECT id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens, used_tokens,
       created_at, updated_at
FROM budgets WHERE scope_type = $1 AND scope_id = $2;

-- name: find_by_swarm
-- Every budget of a swarm, swarm scope first, then oldest first.
SELECT id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens, used_tokens,
       created_at, updated_at
FROM budgets WHERE swarm_id = $1
ORDER BY scope_type <> 'swarm', created_at, id LIMIT $2;

-- name: part_list
-- The reads of list() are composed from this start and the part_ fragments after it (see
-- ListReads in repositories/base.py): of every budget (list_by_*), of one scope type
-- (list_of_scope_by_*), and of one swarm (list_in_swarm_by_*), one statement per order column and
-- direction, each listed by statements() of repositories/budgets.py; $1 is the limit, $2 the
-- offset.
SELECT id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens, used_tokens,
       created_at, updated_at
FROM budgets

-- name: part_of_scope
-- One scope type $3.
scope_type = $3

-- name: part_in_swarm
-- One swarm $4 and optionally one scope type $3, NULL = any: found through budgets_swarm_id_idx,
-- so testing $3 costs little.
swarm_id = $4 AND ($3::text IS NULL OR scope_type = $3)

-- name: update
-- Set the fields given, keep the others: each field has a flag (is it given?) and a value, so
-- one statement serves every combination. $1 id; $2/$3 allocated, $4/$5 currency,
-- $6/$7 max_tokens (a NULL value given means unlimited).
UPDATE budgets SET
    allocated = CASE WHEN $2::boolean THEN $3::numeric ELSE allocated END,
    currency = CASE WHEN $4::boolean THEN $5::text ELSE currency END,
    max_tokens = CASE WHEN $6::boolean THEN $7::bigint ELSE max_tokens END
WHERE id = $1
RETURNING id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
          used_tokens, created_at, updated_at;

-- name: delete
-- Delete one budget (its ledger cascades).
DELETE FROM budgets WHERE id = $1 RETURNING 1;

-- name: lock
-- reset_consumption step 1: lock the budget so no consume commits between the next two statements.
SELECT 1 FROM budgets WHERE id = $1 FOR UPDATE;

-- name: delete_ledger
-- reset_consumption step 2: forget the budget's ledger (it must keep summing to the counters).
DELETE FROM budget_ledger WHERE budget_id = $1;

-- name: reset
-- reset_consumption step 3: zero the counters.
UPDATE budgets SET consumed = 0, used_tokens = 0 WHERE id = $1
RETURNING id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
          used_tokens, created_at, updated_at;

-- name: swarm_summary
-- Totals of a swarm's budgets; max_tokens is NULL (unlimited) when any of them is unlimited, and
-- when there is no budget at all (nothing limits the tokens; 0 would mean "no tokens allowed").
SELECT count(*),
       COALESCE(sum(allocated), 0),
       COALESCE(sum(consumed), 0),
       CASE WHEN count(*) = 0 OR bool_or(max_tokens IS NULL) THEN NULL ELSE sum(max_tokens) END,
       COALESCE(sum(used_tokens), 0)
FROM budgets WHERE swarm_id = $1;

-- name: consume
-- The whole consume in one statement: $1 budget, $2 tokens, $3 cost, $4 idempotency key,
-- $5 ledger id.
--   prior  the ledger row of this key, if one was committed before this statement's snapshot
--          (dash_ledger_entries: the unique index, whatever the statistics).
--   upd    one guarded UPDATE applies the charge only if the key is new and the charge fits
--          (unlimited tokens still cannot pass bigint's range). A consume that is refused takes
--          no row lock and writes nothing; one that waited for a concurrent consume is judged on
--          that one's result (READ COMMITTED re-checks the newest row version).
--   led    writes the ledger row of a granted charge. A same-key charge committed after the
--          snapshot makes the unique index raise, which undoes the whole statement (the caller
--          then asks again, and meets that charge as `prior`).
-- Answer: no row = no budget; else granted?, settled? (always true: see consume_one), the prior
-- ledger row (id, tokens, cost) if any, and the budget (after the charge if granted).
WITH prior AS (
    SELECT e.id, e.tokens, e.cost FROM dash_ledger_entries($1::uuid, ARRAY[$4::text]) e
),
upd AS (
    UPDATE budgets
    SET consumed = consumed + $3::numeric, used_tokens = used_tokens + $2::bigint
    WHERE id = $1::uuid
      AND consumed + $3::numeric <= allocated
      AND used_tokens::numeric + $2::bigint <= COALESCE(max_tokens, 9223372036854775807)
      AND NOT EXISTS (SELECT 1 FROM prior)
    RETURNING id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
              used_tokens, created_at, updated_at
),
led AS (
    INSERT INTO budget_ledger (id, budget_id, tokens, cost, idempotency_key)
    SELECT $5::uuid, upd.id, $2::bigint, $3::numeric, $4::text FROM upd
    RETURNING budget_id
)
SELECT true, true, NULL::uuid, NULL::bigint, NULL::numeric,
       id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens, used_tokens,
       created_at, updated_at
FROM upd
UNION ALL
SELECT false, true, p.id, p.tokens, p.cost,
       b.id, b.swarm_id, b.scope_type, b.scope_id, b.allocated, b.consumed, b.currency,
       b.max_tokens, b.used_tokens, b.created_at, b.updated_at
FROM budgets b LEFT JOIN prior p ON true
WHERE b.id = $1::uuid AND NOT EXISTS (SELECT 1 FROM upd);

-- name: consume_new
-- `consume` for a key that cannot be in the ledger yet: one generated for this call and not sent
-- before (consume_one falls back to `consume` on any retry, since a lost attempt may have written
-- it). It skips the ledger look-up, which costs more than the rest of the statement, above all
-- when the UPDATE waits for a concurrent charge and its condition is checked again. The same
-- parameters and answer as `consume` (the prior ledger row is always NULL). The unique index still
-- refuses a second row under the key.
WITH upd AS (
    UPDATE budgets
    SET consumed = consumed + $3::numeric, used_tokens = used_tokens + $2::bigint
    WHERE id = $1::uuid
      AND consumed + $3::numeric <= allocated
      AND used_tokens::numeric + $2::bigint <= COALESCE(max_tokens, 9223372036854775807)
    RETURNING id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
              used_tokens, created_at, updated_at
),
led AS (
    INSERT INTO budget_ledger (id, budget_id, tokens, cost, idempotency_key)
    SELECT $5::uuid, upd.id, $2::bigint, $3::numeric, $4::text FROM upd
    RETURNING budget_id
)
SELECT true, true, NULL::uuid, NULL::bigint, NULL::numeric,
       id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens, used_tokens,
       created_at, updated_at
FROM upd
UNION ALL
SELECT false, true, NULL::uuid, NULL::bigint, NULL::numeric,
       b.id, b.swarm_id, b.scope_type, b.scope_id, b.allocated, b.consumed, b.currency,
       b.max_tokens, b.used_tokens, b.created_at, b.updated_at
FROM budgets b
WHERE b.id = $1::uuid AND NOT EXISTS (SELECT 1 FROM upd);

-- name: consume_batch
-- A batch of consumes of ONE budget in one statement (budget_batcher.py). $1 budget; $2 tokens,
-- $3 costs, $4 keys (distinct) and $5 ledger ids, as parallel text arrays in arrival order
-- (text[] needs no per-connection type introspection by asyncpg; the casts happen here).
--   b      locks the budget row (see consume: after a wait it holds the newest version).
--   req    one row per request, n = its position.
--   prior  the ledger row of each key that has one (dash_ledger_entries: the unique index, never
--          a scan of a long ledger, whatever the statistics).
--   arr    the amounts as arrays, MATERIALIZED so that the walk reads them once, not per step.
--   walk   the greedy pass: step i grants request i (ok) if its key is new and its charge fits
--          what the grants before it left; a request that does not fit charges nothing. Tokens
--          are summed as numeric and capped at bigint's range so no sum can overflow.
--   led    the ledger rows of the granted requests; the unique index refuses a key that another
--          process committed after this statement's snapshot (that request is then reported 'r').
--   upd    adds exactly what `led` wrote to the counters (so the ledger always sums to them).
-- Answer: no row = no budget; else the budget before the batch, the counters and updated_at
-- after it (NULL if nothing was charged), settled? (false = the row changed after our snapshot,
-- so `prior` may have missed keys committed meanwhile: see consume_many), one mark per request
-- (c = charged, i = insufficient, p = key already in the ledger, r = raced: refused by the
-- unique index), and the ledger rows of the 'p' requests in order (id, tokens, cost as text
-- arrays).
WITH RECURSIVE
b AS (
    SELECT id, swarm_id, scope_type, scope_id, allocated, consumed, currency, max_tokens,
           used_tokens, created_at, updated_at, xmin AS ver
    FROM budgets WHERE id = $1::uuid FOR UPDATE
),
req AS (
    SELECT k.n::int AS n, k.tok::bigint AS tok, k.cost::numeric AS cost, k.key, k.lid::uuid AS lid
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS k(tok, cost, key, lid, n)
),
prior AS (
    SELECT r.n, e.id, e.tokens, e.cost
    FROM dash_ledger_entries($1::uuid, $4::text[]) e JOIN req r ON r.key = e.idempotency_key
),
arr AS MATERIALIZED (
    SELECT array_agg(r.tok ORDER BY r.n) AS tok, array_agg(r.cost ORDER BY r.n) AS cost,
           array_agg(p.n IS NOT NULL ORDER BY r.n) AS seen, count(*) AS total
    FROM req r LEFT JOIN prior p ON p.n = r.n
),
walk (i, consumed, used, ok) AS (
    SELECT 0, b.consumed, b.used_tokens::numeric, false FROM b
    UNION ALL
    SELECT s.i,
           s.consumed + CASE WHEN s.ok THEN s.cost ELSE 0 END,
           s.used + CASE WHEN s.ok THEN s.tok ELSE 0 END,
           s.ok
    FROM (
        SELECT w.i + 1 AS i, w.consumed, w.used, a.cost[w.i + 1] AS cost, a.tok[w.i + 1] AS tok,
               NOT a.seen[w.i + 1]
               AND w.consumed + a.cost[w.i + 1] <= b.allocated
               AND w.used + a.tok[w.i + 1] <= COALESCE(b.max_tokens, 9223372036854775807) AS ok
        FROM walk w, arr a, b
        WHERE w.i < a.total
    ) s
),
led AS (
    INSERT INTO budget_ledger (id, budget_id, tokens, cost, idempotency_key)
    SELECT r.lid, $1::uuid, r.tok, r.cost, r.key
    FROM walk w JOIN req r ON r.n = w.i
    WHERE w.ok
    ORDER BY w.i
    ON CONFLICT (budget_id, idempotency_key) DO NOTHING
    RETURNING idempotency_key, tokens, cost
),
upd AS (
    UPDATE budgets
    SET consumed = budgets.consumed + t.cost, used_tokens = budgets.used_tokens + t.tokens
    FROM (SELECT sum(cost) AS cost, sum(tokens) AS tokens FROM led HAVING count(*) > 0) t
    WHERE budgets.id = $1::uuid
    RETURNING budgets.consumed, budgets.used_tokens, budgets.updated_at
)
SELECT b.id, b.swarm_id, b.scope_type, b.scope_id, b.allocated, b.consumed, b.currency,
       b.max_tokens, b.used_tokens, b.created_at, b.updated_at,
       u.consumed, u.used_tokens, u.updated_at,
       b.ver = (SELECT s.xmin FROM budgets s WHERE s.id = $1::uuid),
       (SELECT string_agg(CASE WHEN p.n IS NOT NULL THEN 'p' WHEN NOT w.ok THEN 'i'
                               WHEN l.idempotency_key IS NULL THEN 'r' ELSE 'c' END, '' ORDER BY w.i)
        FROM walk w
        JOIN req r ON r.n = w.i
        LEFT JOIN prior p ON p.n = w.i
        LEFT JOIN led l ON l.idempotency_key = r.key),
       (SELECT array_agg(p.id::text ORDER BY p.n) FROM prior p),
       (SELECT array_agg(p.tokens::text ORDER BY p.n) FROM prior p),
       (SELECT array_agg(p.cost::text ORDER BY p.n) FROM prior p)
FROM b LEFT JOIN upd u ON true;

-- name: ledger_by_key
-- The ledger row of one idempotency key (the rare path of a consume racing a same-key consume).
SELECT id, tokens, cost FROM dash_ledger_entries($1::uuid, ARRAY[$2::text]);

-- name: ledger_by_keys
-- The ledger rows of several keys (the rare path of a batch racing same-key consumes elsewhere).
SELECT idempotency_key, id, tokens, cost FROM dash_ledger_entries($1::uuid, $2::text[]);

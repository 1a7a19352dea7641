-- Migration: ledger_lookup
-- Created: 2026-11-30T17:55:00Z

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

-- Migration: budget_percentage
-- Created: 2026-11-30T16:30:00Z

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

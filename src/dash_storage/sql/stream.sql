-- The event log read as a stream: rows in (tx_id, seq) order, below the mark of finished
-- transactions (see the event_stream migration for why that gives no gap and no duplicate).

-- name: part_mark
-- The mark (every transaction with a smaller id has finished), the next transaction id, and whether
-- rows exist at or above the mark (a transaction still open holds them back). Starts a page query.
WITH mark AS MATERIALIZED (
    SELECT m.xmin, m.horizon,
           COALESCE((SELECT h.tx_id FROM events h ORDER BY h.tx_id DESC LIMIT 1) >= m.xmin, false) AS held
    FROM (SELECT pg_snapshot_xmin(s) AS xmin, pg_snapshot_xmax(s) AS horizon
          FROM pg_current_snapshot() s) m
)

-- name: part_page
-- One page of the stream after position ($1 tx_id as text, $2 seq), below the mark, in stream
-- order, up to $3 rows. Filters ($4 swarm, $5 types, $6 agent; NULL = any) only blank the
-- columns of rows that are not wanted, so the reader still learns how far it has scanned. One
-- row with NULL position when the page is empty; every row carries the mark.
, page AS MATERIALIZED (
    SELECT e.tx_id, e.seq, e.id, e.swarm_id, e.agent_id, e.type, e.payload, e."timestamp",
           e.correlation_id, e.parent_event_id, e.entity_type, e.severity,
           ($4::uuid IS NULL OR e.swarm_id = $4::uuid)
           AND ($5::text[] IS NULL OR e.type = ANY ($5::text[]))
           AND ($6::uuid IS NULL OR e.agent_id = $6::uuid) AS wanted
    FROM events e
    WHERE (e.tx_id, e.seq) > ($1::text::xid8, $2::bigint)
      AND e.tx_id < (SELECT xmin FROM mark)
    ORDER BY e.tx_id, e.seq
    LIMIT $3
)
SELECT mark.xmin::text AS mark,
       mark.held,
       mark.horizon::text AS horizon,
       p.tx_id::text AS tx_id, p.seq, p.wanted,
       CASE WHEN p.wanted THEN p.id END AS id,
       CASE WHEN p.wanted THEN p.swarm_id END AS swarm_id,
       CASE WHEN p.wanted THEN p.agent_id END AS agent_id,
       CASE WHEN p.wanted THEN p.type END AS type,
       CASE WHEN p.wanted THEN p.payload END AS payload,
       CASE WHEN p.wanted THEN p."timestamp" END AS "timestamp",
       CASE WHEN p.wanted THEN p.correlation_id END AS correlation_id,
       CASE WHEN p.wanted THEN p.parent_event_id END AS parent_event_id,
       CASE WHEN p.wanted THEN p.entity_type END AS entity_type,
       CASE WHEN p.wanted THEN p.severity END AS severity
FROM mark LEFT JOIN page p ON true
ORDER BY p.tx_id, p.seq

-- name: part_page_all
-- The same page with no filter: every row is wanted, so nothing needs blanking.
, page AS MATERIALIZED (
    SELECT e.tx_id, e.seq, e.id, e.swarm_id, e.agent_id, e.type, e.payload, e."timestamp",
           e.correlation_id, e.parent_event_id, e.entity_type, e.severity
    FROM events e
    WHERE (e.tx_id, e.seq) > ($1::text::xid8, $2::bigint)
      AND e.tx_id < (SELECT xmin FROM mark)
    ORDER BY e.tx_id, e.seq
    LIMIT $3
)
SELECT mark.xmin::text AS mark, mark.held, mark.horizon::text AS horizon,
       p.tx_id::text AS tx_id, p.seq, true AS wanted,
       p.id, p.swarm_id, p.agent_id, p.type, p.payload, p."timestamp", p.correlation_id,
       p.parent_event_id, p.entity_type, p.severity
FROM mark LEFT JOIN page p ON true
ORDER BY p.tx_id, p.seq

-- name: mark
-- The current mark: every transaction with a smaller id has finished.
SELECT pg_snapshot_xmin(pg_current_snapshot())::text;

-- name: horizon
-- The next transaction id to be assigned: every transaction that committed before this call has a
-- smaller one, so a reader whose mark has passed it has everything committed until now.
SELECT pg_snapshot_xmax(pg_current_snapshot())::text;

-- name: save_cursor
-- Remember where the named reader $1 has got to ($2, a cursor string).
INSERT INTO stream_cursors (name, position, updated_at) VALUES ($1, $2, now())
ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at;

-- name: load_cursor
SELECT position FROM stream_cursors WHERE name = $1;

-- name: list_cursors
SELECT name, position, updated_at FROM stream_cursors ORDER BY name;

-- name: backlog
-- How many events a reader at position ($1, $2) has not yet received (up to $3, so that a far
-- behind reader costs a bounded count), and the time of the oldest of them.
SELECT count(*) AS events, min("timestamp") AS oldest
FROM (
    SELECT "timestamp" FROM events
    WHERE (tx_id, seq) > ($1::text::xid8, $2::bigint)
    ORDER BY tx_id, seq
    LIMIT $3
) behind;

-- name: oldest_open_transaction
-- The transaction that holds the mark back: the running one with the oldest transaction id
-- (anywhere on the server), or a prepared transaction left behind (PREPARE TRANSACTION), which
-- pg_stat_activity does not show.
SELECT * FROM (
    SELECT now() - xact_start AS age, pid, datname, usename, application_name, state,
           left(query, 200) AS query, age(backend_xid) AS xid_age
    FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL
    UNION ALL
    SELECT now() - prepared, NULL, database, owner::text, 'prepared transaction ' || gid,
           'prepared', NULL, age(transaction)
    FROM pg_prepared_xacts
) holders
ORDER BY xid_age DESC
LIMIT 1;

-- name: now
SELECT now();

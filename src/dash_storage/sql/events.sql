-- The event log (repositories/events.py, event_ingest.py, event_filters.py).
--
-- Every statement that hands back events returns the columns of core.models.Event, in its field
-- order, as the last columns of its result (an Event is cut from the row's tail, with no count of
-- fields to catch an extra one); the statement registry test checks that against the server.
--
-- The names starting with "part_" are not statements: event_filters.py composes them into the
-- reads of find_by_filter and count (one statement per set of filters, so that every filter is a
-- plain condition the planner can use an index for), and lists every composed statement for the
-- registry test. Each part numbers its parameters from $1; the composer renumbers them.

-- name: insert_event
-- Idempotent create of one event. Its key is (id, timestamp): events is partitioned by time, and
-- the library fixes the timestamp before the first attempt, so a retry repeats the key.
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                    parent_event_id, entity_type, severity)
VALUES ($1, $2, $3, $4, $5, COALESCE($6, now()), $7, $8, $9, $10)
ON CONFLICT (id, "timestamp") DO NOTHING
RETURNING id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
          entity_type, severity;

-- name: insert_event_checked
-- insert_event for an id that may exist already (given by the caller, or on a retry): the key is
-- (id, timestamp), so the ON CONFLICT alone would not see the id stored with another timestamp.
-- One round trip: the row stored under this id if there is one (inserted = false), else the row
-- written (inserted = true). Neither when a concurrent insert of the same key won the conflict.
WITH existing AS (
    SELECT id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
           entity_type, severity
    FROM events WHERE id = $1 LIMIT 1
), written AS (
    INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                        parent_event_id, entity_type, severity)
    SELECT $1, $2, $3, $4, $5, COALESCE($6, now()), $7, $8, $9, $10
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (id, "timestamp") DO NOTHING
    RETURNING id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
              entity_type, severity
)
SELECT true AS inserted, * FROM written
UNION ALL
SELECT false, * FROM existing;

-- name: insert_events
-- A batch as one statement over parallel arrays, first attempt: an existing id fails the whole
-- batch (all or nothing). It hands back only now(), which a timestamp left out (NULL) gets; the
-- library sends every timestamp (fixed before the first attempt) and every other value, so it
-- needs nothing else back. Ids and
-- timestamps go as uuid[] / timestamptz[] (binary: asyncpg looks these array types up once per
-- connection, and each row then costs the server no text parsing), texts and payloads as text[].
-- An array may be NULL instead of all NULLs: unnest() pads it with NULLs. The INSERT is that of
-- insert_events_retry but for its ON CONFLICT and RETURNING clauses.
WITH written AS (
    INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                        parent_event_id, entity_type, severity)
    SELECT u.id, u.swarm_id, u.agent_id, u.type, u.payload::jsonb, COALESCE(u.ts, now()),
           u.correlation_id, u.parent_event_id, u.entity_type, u.severity
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[],
                $7::text[], $8::uuid[], $9::text[], $10::text[])
         AS u(id, swarm_id, agent_id, type, payload, ts, correlation_id, parent_event_id,
              entity_type, severity)
)
SELECT now();

-- name: insert_events_retry
-- The batch insert on a retry attempt: rows written by the attempt whose answer was lost are
-- skipped (and read back by select_events_by_ids); the rows written are handed back.
INSERT INTO events (id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
                    parent_event_id, entity_type, severity)
SELECT u.id, u.swarm_id, u.agent_id, u.type, u.payload::jsonb, COALESCE(u.ts, now()),
       u.correlation_id, u.parent_event_id, u.entity_type, u.severity
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[],
            $7::text[], $8::uuid[], $9::text[], $10::text[])
     AS u(id, swarm_id, agent_id, type, payload, ts, correlation_id, parent_event_id,
          entity_type, severity)
ON CONFLICT (id, "timestamp") DO NOTHING
RETURNING id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
          entity_type, severity;

-- name: select_missing_swarm
-- After a batch failed on a missing swarm: the first of these swarm ids (text, in batch order)
-- that has no row, so that the error names it.
SELECT u.id::uuid FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n)
WHERE NOT EXISTS (SELECT 1 FROM swarms p WHERE p.id = u.id::uuid)
ORDER BY u.n LIMIT 1;

-- name: select_missing_agent
-- After a batch failed on a missing agent: the first of these agent ids (text, in batch order)
-- that has no row, so that the error names it.
SELECT u.id::uuid FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n)
WHERE NOT EXISTS (SELECT 1 FROM agents p WHERE p.id = u.id::uuid)
ORDER BY u.n LIMIT 1;

-- name: select_event_by_id
-- One event by primary key.
SELECT id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
       entity_type, severity
FROM events WHERE id = $1;

-- name: select_event_by_id_flagged
-- The row of select_event_by_id in the shape of insert_event_checked (inserted = false).
SELECT false AS inserted, id, swarm_id, agent_id, type, payload, "timestamp", correlation_id,
       parent_event_id, entity_type, severity
FROM events WHERE id = $1 LIMIT 1;

-- name: select_events_by_ids
-- Events by primary keys given as text (the retry paths of a batch write).
SELECT id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
       entity_type, severity
FROM events WHERE id = ANY($1::text[]::uuid[]);

-- name: select_stats_24h
-- The event_stats_24h view (the fields of core.models.EventTypeStats), busiest type first.
SELECT event_type, event_count, unique_agents, unique_swarms, first_event, last_event
FROM event_stats_24h
ORDER BY event_count DESC, event_type;

-- name: part_select_events
-- Start of find_by_filter: the events, then the WHERE clause of the filters given, then the order.
SELECT id, swarm_id, agent_id, type, payload, "timestamp", correlation_id, parent_event_id,
       entity_type, severity
FROM events

-- name: part_count_events
-- Start of count: then the WHERE clause of the filters given.
SELECT count(*) FROM events

-- name: part_swarm_id
swarm_id = $1

-- name: part_agent_id
agent_id = $1

-- name: part_types
type = ANY($1::text[])

-- name: part_entity_type
entity_type = $1

-- name: part_severity
severity = $1

-- name: part_since
-- Time windows are half-open: since <= timestamp < until.
"timestamp" >= $1

-- name: part_until
"timestamp" < $1

-- name: part_after_asc
-- The keyset cursor, ascending: rows after ($1 = timestamp, $2 = id) in (timestamp, id) order.
("timestamp", id) > ($1, $2)

-- name: part_after_desc
-- The keyset cursor, descending: rows before ($1 = timestamp, $2 = id).
("timestamp", id) < ($1, $2)

-- name: part_order_asc
-- Oldest first; $1 is the limit.
ORDER BY "timestamp" ASC, id ASC LIMIT $1

-- name: part_order_desc
-- Newest first; $1 is the limit.
ORDER BY "timestamp" DESC, id DESC LIMIT $1

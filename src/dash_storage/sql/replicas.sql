-- name: primary_lsn
-- Where the primary's WAL ends now: every transaction committed before this call is at or below it.
-- A read that must see this process's own writes waits until a replica has replayed this far.
SELECT pg_current_wal_lsn()

-- name: replayed_lsn
-- How far a replica has replayed the primary's WAL (the one cheap check before a read that must
-- see this process's own writes).
SELECT pg_last_wal_replay_lsn()

-- name: replica_state
-- A replica's health: whether it is a replica at all (in recovery), how far it has replayed, and
-- its replay lag in seconds: 0 when it has replayed all the WAL it received, else the age of the
-- last transaction it replayed (the time its replay is behind the primary's commits).
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_replay_lsn() AS replayed,
       CASE
           WHEN pg_last_wal_receive_lsn() IS NULL
               OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()
               OR pg_last_xact_replay_timestamp() IS NULL THEN 0.0
           ELSE extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
       END AS lag

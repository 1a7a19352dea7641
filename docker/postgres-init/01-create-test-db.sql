-- Run once by the postgres image on an empty data volume (as POSTGRES_USER, via psql).
-- Creates the separate database the test suite uses, so tests never touch `dash`.
-- Schema is NOT created here: `dash-db migrate` applies the migrations.
-- \gexec form so a POSTGRES_DB=dash_test override does not make initdb fail.
SELECT 'CREATE DATABASE dash_test'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'dash_test')\gexec

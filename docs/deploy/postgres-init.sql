-- Runs once, on the first start of the compose Postgres: the DuckLake catalog gets its own
-- database beside Dagster's (dagster), owned by the same role.
CREATE DATABASE lake OWNER etl;

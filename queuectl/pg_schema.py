"""The PostgreSQL schema, versioned like SQLite's (queuectl/database.py), in a schema of its own.

PostgreSQL numbering is its own: version 1 is SQLite's version 2 layout (the backend did
not exist before it). Each entry migrates version i to i+1; never edit a released entry,
append a new one. The version lives in ``meta`` under ``schema_version``.
"""
from __future__ import annotations

from typing import List

VERSION_KEY = "schema_version"

MIGRATIONS: List[str] = [
    """
    CREATE SEQUENCE jobs_seq;  -- insertion order; generated ids are str(seq)
    CREATE TABLE jobs (
        seq              bigint  PRIMARY KEY DEFAULT nextval('jobs_seq'),
        id               text    NOT NULL UNIQUE,
        command          text    NOT NULL,              -- shell string, or JSON array when argv = 1
        argv             integer NOT NULL DEFAULT 0,
        state            text    NOT NULL,
        priority         bigint  NOT NULL DEFAULT 0,
        attempts         bigint  NOT NULL DEFAULT 0,
        max_retries      bigint,                        -- NULL: the config value
        timeout          double precision,              -- NULL: the config value
        cwd              text,
        run_at           double precision NOT NULL,     -- epoch seconds, like SQLite's REAL
        created_at       double precision NOT NULL,
        updated_at       double precision NOT NULL,
        started_at       double precision,
        finished_at      double precision,
        worker_id        text,
        lease_until      double precision,
        job_pid          bigint,
        job_pid_start    bigint,
        exit_code        bigint,
        last_error       text,
        output_tail      text,
        unique_key       text,
        deps_left        bigint  NOT NULL DEFAULT 0,
        cancel_requested integer NOT NULL DEFAULT 0
    );
    ALTER SEQUENCE jobs_seq OWNED BY jobs.seq;
    -- The claim path: runnable jobs in claim order; finished rows are not in it at all.
    CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq)
        WHERE state IN ('pending', 'failed') AND deps_left = 0;
    CREATE INDEX jobs_state ON jobs (state, seq) WHERE state <> 'completed';
    CREATE UNIQUE INDEX jobs_unique_key ON jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('pending', 'failed', 'processing');
    CREATE TABLE job_deps (
        dep_id text NOT NULL,
        job_id text NOT NULL,
        PRIMARY KEY (dep_id, job_id)
    );
    CREATE INDEX job_deps_job ON job_deps (job_id);
    CREATE TABLE job_runs (
        n           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- SQLite's rowid: run order
        job_id      text NOT NULL,
        attempt     bigint NOT NULL,
        worker_id   text,
        started_at  double precision,
        finished_at double precision,
        exit_code   bigint,
        error       text
    );
    CREATE INDEX job_runs_job ON job_runs (job_id);
    CREATE TABLE config (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
    """,
    # Version 2 = SQLite's version 3: captured environments stored once, attempt numbers that
    # never restart (retry_base). used_at: an enqueue refreshes it when it picks an env, and
    # unused envs are deleted only when it is old, so a purge never deletes the env of an
    # enqueue still in flight (READ COMMITTED cannot see its uncommitted job row).
    """
    CREATE TABLE envs (
        id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        digest  text NOT NULL UNIQUE,
        vars    text NOT NULL,                -- JSON object {name: value}
        inherit integer NOT NULL DEFAULT 0,   -- 1: vars go over the worker's own environment
        used_at double precision NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN env_id bigint;          -- NULL: the worker's own environment
    ALTER TABLE jobs ADD COLUMN retry_base bigint NOT NULL DEFAULT 0;
    """,
    # Workers on many hosts: the registry and where each job's full log lives (see the
    # SQLite migration of the same purpose in queuectl/database.py).
    """
    CREATE TABLE workers (
        worker_id      text    PRIMARY KEY,             -- host:pid:start
        host           text    NOT NULL,
        pid            bigint  NOT NULL,
        started_at     double precision NOT NULL,
        heartbeat_at   double precision NOT NULL,
        mode           text    NOT NULL DEFAULT '',
        stop_requested integer NOT NULL DEFAULT 0       -- 1 graceful, 2 forced
    );
    ALTER TABLE jobs ADD COLUMN log_location text;
    """,
    # A queue table is rewritten all the time (every job is inserted, claimed and finished):
    # the default autovacuum waits for 20 % of the table to be dead, and until then each
    # claim walks the dead entries of jobs_ready. Vacuum it after a fixed number instead.
    """
    ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                          autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000);
    ALTER TABLE job_runs SET (autovacuum_vacuum_scale_factor = 0.05);
    """,
    # Schedules (see the SQLite migration of the same purpose in queuectl/database.py).
    """
    CREATE TABLE schedules (
        name          text    PRIMARY KEY,
        kind          text    NOT NULL,
        expr          text    NOT NULL,
        tz            text,
        spec          text    NOT NULL,
        env           text,
        catch_up      text    NOT NULL,
        overlap       text    NOT NULL,
        paused        integer NOT NULL DEFAULT 0,
        created_at    double precision NOT NULL,
        next_at       double precision NOT NULL,
        last_slot     double precision,
        last_job      text,
        last_fired_at double precision
    );
    CREATE INDEX schedules_due ON schedules (next_at) WHERE paused = 0;
    CREATE TABLE schedule_skips (
        n        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name     text    NOT NULL,
        slot_at  double precision NOT NULL,
        until_at double precision NOT NULL,
        count    bigint  NOT NULL,
        reason   text    NOT NULL,
        at       double precision NOT NULL
    );
    CREATE INDEX schedule_skips_name ON schedule_skips (name, at);
    """,
    # Retention's index and the run counters (see the SQLite migration of the same purpose
    # in queuectl/database.py).
    """
    UPDATE jobs SET finished_at = updated_at
        WHERE finished_at IS NULL AND state IN ('completed', 'dead', 'cancelled');
    CREATE INDEX jobs_finished ON jobs (state, finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE counters (
        shard  text NOT NULL,
        metric text NOT NULL,
        labels text NOT NULL DEFAULT '',
        value  double precision NOT NULL,
        PRIMARY KEY (shard, metric, labels)
    );
    """,
    # Capacity: groups with a limit, slots per job (see the SQLite migration of the same
    # purpose in queuectl/database.py). The trigger's WHEN keeps it free for jobs of groups
    # without a limit (counted = 0): their claims and finishes never touch a groups row.
    """
    ALTER TABLE jobs ADD COLUMN grp text NOT NULL DEFAULT 'default';
    ALTER TABLE jobs ADD COLUMN slots integer NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN counted integer NOT NULL DEFAULT 0;
    CREATE TABLE groups (
        name     text    PRIMARY KEY,
        parallel integer,                    -- at most this many run at once; NULL: no limit
        running  integer NOT NULL DEFAULT 0, -- runs counted against parallel
        paused   integer NOT NULL DEFAULT 0
    );
    INSERT INTO groups (name) VALUES ('default');
    DROP INDEX jobs_ready;
    CREATE INDEX jobs_ready_grp ON jobs (grp, priority DESC, run_at, seq)
        WHERE state IN ('pending', 'failed') AND deps_left = 0;
    CREATE FUNCTION jobs_group_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.state = 'processing' AND NEW.counted = 1 AND OLD.state <> 'processing' THEN
            UPDATE groups SET running = running + 1 WHERE name = NEW.grp;
        ELSIF OLD.state = 'processing' AND OLD.counted = 1 AND NEW.state <> 'processing' THEN
            UPDATE groups SET running = running - 1 WHERE name = OLD.grp;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_group_count AFTER UPDATE OF state ON jobs FOR EACH ROW
        WHEN ((NEW.counted = 1 AND NEW.state = 'processing' AND OLD.state <> 'processing')
              OR (OLD.counted = 1 AND OLD.state = 'processing' AND NEW.state <> 'processing'))
        EXECUTE FUNCTION jobs_group_count();
    ALTER TABLE workers ADD COLUMN capacity integer NOT NULL DEFAULT 1;
    ALTER TABLE workers ADD COLUMN groups text NOT NULL DEFAULT '';  -- comma-separated; '' all
    """,
    # Jobs some dependent waits for (see the SQLite migration of the same purpose in
    # queuectl/database.py). Set under the row lock the enqueue of the dependent takes, so a
    # finish that commits after it sees the flag in its own UPDATE's RETURNING.
    """
    ALTER TABLE jobs ADD COLUMN waited_on integer NOT NULL DEFAULT 0;
    UPDATE jobs SET waited_on = 1 WHERE id IN (SELECT dep_id FROM job_deps);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

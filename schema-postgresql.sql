-- The job store in PostgreSQL, shared by any number of instances. Applied at every start, under an advisory
-- lock so that instances starting at once take turns: it only creates what is missing and never drops data.
-- The version of this schema is in the table schema_version (app.py creates it first).

CREATE TABLE IF NOT EXISTS template_versions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    definition  text NOT NULL,             -- the template's TOML table as JSON, without key, key_env or secrets
    key_digest  text NOT NULL DEFAULT '',  -- SHA-256 of the key, never the key
    digest      text NOT NULL UNIQUE       -- SHA-256 of the three above: one row per distinct version
);

CREATE TABLE IF NOT EXISTS jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the job token: never reused
    template_version bigint NOT NULL REFERENCES template_versions (id),
    template         text NOT NULL,
    status           text NOT NULL CHECK (status IN ('Pending', 'Executing', 'Succeeded', 'Warning', 'Error')),
    variables        text NOT NULL,        -- JSON object; a secret variable is named here with a null value
    process_group    integer,              -- no longer written (see process_groups); read for older versions
    created_at       double precision NOT NULL,  -- seconds since the epoch, by the database's clock
    started_at       double precision,
    finished_at      double precision,
    secrets          text,                 -- JSON object of the secret values, until the job is final
    max_concurrent   integer,              -- the template's limit when the job was triggered
    owner            text,                 -- the instance that claimed the job
    slot             integer,              -- which of its template's max_concurrent places it runs in
    cancel_requested integer NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_by_template ON jobs (template, id);
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- What a claim looks up, each in one index however many jobs are Pending: the oldest unlimited job, and
-- the oldest Pending job of each limited template (they start in trigger order).
CREATE INDEX IF NOT EXISTS jobs_pending_unlimited ON jobs (id)
    WHERE status = 'Pending' AND max_concurrent IS NULL;
CREATE INDEX IF NOT EXISTS jobs_pending_limited ON jobs (template, id)
    WHERE status = 'Pending' AND max_concurrent IS NOT NULL;
DROP INDEX IF EXISTS jobs_pending_by_template;  -- the one index of both, before version 2's last change
-- max_concurrent, enforced by the database: no two Executing jobs of a template share a slot, whichever
-- instances claimed them.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_running_slots ON jobs (template, slot)
    WHERE status = 'Executing' AND slot IS NOT NULL;

-- The process group of each job's running step, as earlier versions of app.py noted it so that an instance
-- on the same host could kill it if the instance running the job died. No longer written: an instance now
-- finds a dead one's processes by the JobInstance in their environment. Still read, and each instance's
-- sweep deletes the notes of jobs no longer Executing, while an instance of an earlier version may share
-- the database.
CREATE TABLE IF NOT EXISTS process_groups (
    job_id        bigint PRIMARY KEY,
    process_group integer NOT NULL
);

-- One row per log entry (one line), numbered from 0 within its job in the order logged.
CREATE TABLE IF NOT EXISTS logs (
    job_id  bigint NOT NULL,
    seq     integer NOT NULL,
    level   text NOT NULL CHECK (level IN ('DEBUG', 'INFO', 'WARN', 'ERROR')),
    message text NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- Each start of a server instance, with the lease it renews while it lives (by the database's clock).
CREATE TABLE IF NOT EXISTS instances (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    boot_id     text NOT NULL,             -- instances with the same boot id run on the same machine
    pid         integer NOT NULL,
    started_at  double precision NOT NULL,
    lease_until double precision NOT NULL
);

-- Values all instances share, such as the secret that signs the web page's forms.
CREATE TABLE IF NOT EXISTS settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

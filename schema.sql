-- The job store in SQLite. Applied at every start: it only creates what is missing and never drops data
-- (app.py first brings a database of an older schema up to date; PRAGMA user_version records which it is).

-- Must come before the first table of a new database; pruning then gives freed pages back to the disk.
PRAGMA auto_vacuum = INCREMENTAL;

-- Each distinct definition a template has had, so that a job runs (and is authorised) with the template
-- as it was when it was triggered. The key itself is never stored: only its SHA-256 ('' for no key).
CREATE TABLE IF NOT EXISTS template_versions (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    definition  TEXT NOT NULL,             -- the template's TOML table as JSON, without key, key_env or secrets
    key_digest  TEXT NOT NULL DEFAULT '',
    digest      TEXT                       -- SHA-256 of the three above: one row per distinct version
);
CREATE UNIQUE INDEX IF NOT EXISTS template_versions_digest ON template_versions (digest);

CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- the job token: never reused, even after pruning
    template_version INTEGER NOT NULL REFERENCES template_versions (id),
    template         TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('Pending', 'Executing', 'Succeeded', 'Warning', 'Error')),
    variables        TEXT NOT NULL,        -- JSON object; a secret variable is named here with a null value
    process_group    INTEGER,              -- no longer written (see process_groups); read for older versions
    created_at       REAL NOT NULL,        -- seconds since the epoch, by the database's clock
    started_at       REAL,
    finished_at      REAL,
    secrets          TEXT,                 -- JSON object of the secret values, until the job is final
    max_concurrent   INTEGER,              -- the template's limit when the job was triggered
    owner            TEXT,                 -- the instance that claimed the job
    slot             INTEGER,              -- which of its template's max_concurrent places it runs in
    cancel_requested INTEGER NOT NULL DEFAULT 0
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
-- max_concurrent, enforced by the database: no two Executing jobs of a template share a slot.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_running_slots ON jobs (template, slot)
    WHERE status = 'Executing' AND slot IS NOT NULL;
DROP INDEX IF EXISTS jobs_unfinished;  -- of the first schema: jobs_by_status serves its queries

-- The process group of each job's running step, as earlier versions of app.py noted it so that an instance
-- on the same host could kill it if the instance running the job died. No longer written: an instance now
-- finds a dead one's processes by the JobInstance in their environment. Still read, and each instance's
-- sweep deletes the notes of jobs no longer Executing, while an instance of an earlier version may share
-- the database.
CREATE TABLE IF NOT EXISTS process_groups (
    job_id        INTEGER PRIMARY KEY,
    process_group INTEGER NOT NULL
);

-- One row per log entry (one line), numbered from 0 within its job in the order logged.
CREATE TABLE IF NOT EXISTS logs (
    job_id  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    level   TEXT NOT NULL CHECK (level IN ('DEBUG', 'INFO', 'WARN', 'ERROR')),
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

-- Each start of a server instance, with the lease it renews while it lives (by the database's clock).
CREATE TABLE IF NOT EXISTS instances (
    id          TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    boot_id     TEXT NOT NULL,             -- instances with the same boot id run on the same machine
    pid         INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    lease_until REAL NOT NULL
);

-- Values all instances share, such as the secret that signs the web page's forms.
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

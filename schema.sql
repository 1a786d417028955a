-- The job store. Applied at every start: it only creates what is missing and never drops data.

-- Must come before the first table of a new database; pruning then gives freed pages back to the disk.
PRAGMA auto_vacuum = INCREMENTAL;

-- Each distinct definition a template has had, so that a job runs (and is authorised) with the template
-- as it was when it was triggered. The key itself is never stored: only its SHA-256 ('' for no key).
CREATE TABLE IF NOT EXISTS template_versions (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    definition  TEXT NOT NULL,             -- the template's TOML table as JSON, without key or key_env
    key_digest  TEXT NOT NULL DEFAULT '',
    UNIQUE (name, definition, key_digest)
);

CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- the job token: never reused, even after pruning
    template_version INTEGER NOT NULL REFERENCES template_versions (id),
    template         TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('Pending', 'Executing', 'Succeeded', 'Warning', 'Error')),
    variables        TEXT NOT NULL,        -- JSON object; secret values are removed when the job finishes
    process_group    INTEGER,              -- of the step running now, to clean up after a crash
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);

CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status, id) WHERE status IN ('Pending', 'Executing');
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- One row per log entry (one line), numbered from 0 within its job in the order logged.
CREATE TABLE IF NOT EXISTS logs (
    job_id  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    level   TEXT NOT NULL CHECK (level IN ('DEBUG', 'INFO', 'WARN', 'ERROR')),
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

"""The job store on both databases, in process: the queue (claims in trigger order, exactly once, max_concurrent
held by the database), writes that hold only for the job's owner, leases and orphaned jobs, cancel, events,
and (SQLite only) the upgrade of a database of the first schema."""

import contextlib
import json
import sqlite3
import threading
import time

import pytest

import app as server_module
from conftest import final_status, logs_of, query, store_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    return store_database(request.param, request, tmp_path)


@pytest.fixture
def store(database):
    store = server_module.open_store(database)
    events = []
    store.listener = events.append
    store.events = events
    yield store
    store.close()


def template(store, name="t", max_concurrent=None, secret=False):
    spec = {"steps": [{"log": "x"}], "variables": {"Word": {"default": "", "secret": secret}}}
    if max_concurrent:
        spec["max_concurrent"] = max_concurrent
    parsed = server_module.parse_template(name, spec, name)
    version = store.save_template_version(parsed.name, parsed.definition, parsed.key_digest)
    return server_module.dataclasses.replace(parsed, version=version)


@pytest.fixture
def instance(store):
    store.register_instance("instance-a", 60)
    return "instance-a"


def test_jobs_are_claimed_in_trigger_order_and_marked_executing_for_their_owner(store, database, instance):
    t = template(store)
    ids = [store.insert_job(t, {"Word": str(n)}) for n in range(3)]
    assert ids == sorted(ids)
    claims = [store.claim_job(instance) for _ in range(3)]
    assert [claim.id for claim in claims] == ids
    assert [claim.variables for claim in claims] == [{"Word": "0"}, {"Word": "1"}, {"Word": "2"}]
    assert store.claim_job(instance) is None
    assert query(database, "SELECT status, owner FROM jobs ORDER BY id") == [("Executing", instance)] * 3


def test_a_claim_returns_secrets_that_the_stored_variables_only_name(store, database, instance):
    t = template(store, secret=True)
    job_id = store.insert_job(t, {"Word": "hunter2"})
    assert query(database, "SELECT variables, secrets FROM jobs") == [('{"Word": null}', '{"Word": "hunter2"}')]
    assert store.claim_job(instance).variables == {"Word": "hunter2"}
    assert store.finish_job(job_id, instance, "Succeeded", 0, [("INFO", "done")])
    assert query(database, "SELECT variables, secrets FROM jobs") == [('{"Word": null}', None)]


def test_each_job_is_claimed_exactly_once_by_concurrent_claimers(store, instance):
    t = template(store)
    ids = {store.insert_job(t, {}) for _ in range(200)}
    claimed, failures = [], []

    def claimer():
        try:
            while (claim := store.claim_job(instance)) is not None:
                claimed.append(claim.id)
        except Exception as error:  # reported below, not lost in the thread
            failures.append(error)

    threads = [threading.Thread(target=claimer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert sorted(claimed) == sorted(ids)


def test_max_concurrent_is_held_by_slots_and_other_templates_go_on(store, instance):
    limited, other = template(store, "limited", max_concurrent=2), template(store, "other")
    first, second, third = (store.insert_job(limited, {}) for _ in range(3))
    free = store.insert_job(other, {})
    assert [store.claim_job(instance).id for _ in range(3)] == [first, second, free]
    assert store.claim_job(instance) is None, "the third limited job waits for a slot"
    assert store.finish_job(first, instance, "Succeeded", 0, [])
    assert store.claim_job(instance).id == third


def test_unlimited_and_limited_jobs_start_in_trigger_order_between_them(store, instance):
    limited, other = template(store, "limited", max_concurrent=1), template(store, "other")
    ids = [store.insert_job(t, {}) for t in (other, limited, other, limited, other)]
    claimed = [store.claim_job(instance).id for _ in range(4)]
    assert claimed == [ids[0], ids[1], ids[2], ids[4]], "the second limited job waits for the first's slot"
    assert store.finish_job(ids[1], instance, "Succeeded", 0, [])
    assert store.claim_job(instance).id == ids[3]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_claim_reads_one_queued_job_however_long_the_queue(store, database, instance):
    """PostgreSQL's planner, believing few jobs Pending, once read and sorted the whole queue at each claim, and
    read the whole backlog of a full limited template."""
    t, limited = template(store), template(store, "limited", max_concurrent=1)
    ids = [store.insert_job(each, {}) for _ in range(300) for each in (t, limited)]
    assert [store.claim_job(instance).id for _ in range(2)] == ids[:2]
    # the limited template is full now, 299 of its jobs held back behind the running one
    import psycopg

    with psycopg.connect(database) as db:
        sql = store.sql(server_module.CLAIM_JOB)
        plan = db.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, (instance, instance)).fetchone()[0]
        db.rollback()

    def scans(node):
        if "Relation Name" in node and node["Relation Name"] == "jobs" and node.get("Alias") in ("p", "p_1"):
            yield node
        for child in node.get("Plans", []):
            yield from scans(child)

    found = list(scans(plan[0]["Plan"]))
    assert found, plan
    assert all(node["Actual Rows"] <= 1 and node.get("Rows Removed by Filter", 0) <= 1 for node in found), [
        (n["Node Type"], n["Actual Rows"], n.get("Rows Removed by Filter")) for n in found]


def test_a_job_triggered_into_an_empty_queue_can_be_committed_claimed(store, database, instance):
    t = template(store)
    first, started = store.insert_started_job(t, {"Word": "a"}, instance)
    assert started and store.events[-1:] != [server_module.StoreEvent("work", first)], "no worker is told"
    assert query(database, "SELECT status, owner FROM jobs WHERE id = ?", first) == [("Executing", instance)]
    pending = store.insert_job(t, {})
    second, started = store.insert_started_job(t, {}, instance)
    assert not started, "a job already Pending goes first"
    assert store.events[-1] == server_module.StoreEvent("work", second)
    assert [store.claim_job(instance).id for _ in range(2)] == [pending, second]
    query(database, "UPDATE instances SET lease_until = 0 WHERE id = ?", instance)
    third, started = store.insert_started_job(t, {}, instance)
    assert not started and store.job_status(third) == "Pending", "not for an instance whose lease ran out"


def test_a_job_can_end_and_its_worker_claim_the_next_in_one_write(store, database, instance):
    """finish_job_and_claim (one statement on PostgreSQL, for the end of an unlimited template's job): the
    end stores and tells what finish_job does, and the claim takes the oldest job that may start."""
    t, limited = template(store), template(store, "limited", max_concurrent=1)
    busy, held = store.insert_job(limited, {}), store.insert_job(limited, {})
    ending, later = store.insert_job(t, {}), store.insert_job(t, {"Word": "next"})
    assert [store.claim_job(instance).id for _ in range(2)] == [busy, ending]
    store.events.clear()
    owned, claim = store.finish_job_and_claim(ending, instance, "Succeeded", 0, [("INFO", "done")])
    assert owned and claim == server_module.Claim(later, t.version, {"Word": "next"}, False), "held waits"
    assert store.events == [server_module.StoreEvent("job", ending, server_module.Progress("Succeeded", 1))]
    entries = query(database, "SELECT seq, level, message FROM logs WHERE job_id = ?", ending)
    assert entries == [(0, "INFO", "done")]
    assert query(database, "SELECT id, status, owner FROM jobs ORDER BY id") == [
        (busy, "Executing", instance), (held, "Pending", None), (ending, "Succeeded", instance),
        (later, "Executing", instance)]
    # Not this instance's job any more: nothing of the end is stored or told, and the claim is made all the same.
    assert store.finish_job(busy, instance, "Succeeded", 0, [])
    store.events.clear()
    owned, claim = store.finish_job_and_claim(ending, instance, "Error", 1, [("ERROR", "late")])
    assert not owned and claim.id == held and not store.events
    assert query(database, "SELECT count(*) FROM logs WHERE job_id = ?", ending) == [(1,)]
    assert store.job_status(ending) == "Succeeded"
    statements, run = [], store._run
    store._run = lambda db, statement, *rest: statements.append(statement) or run(db, statement, *rest)
    assert store.finish_job_and_claim(later, instance, "Succeeded", 0, []) == (True, None), "none left"
    if database.startswith("postgresql:"):
        assert len(statements) == 1, "one round trip"


def test_the_database_refuses_two_executing_jobs_in_one_slot(store, database, instance):
    """max_concurrent is enforced by a unique index, not by a count two instances could read at once."""
    limited = template(store, "limited", max_concurrent=1)
    first, second = store.insert_job(limited, {}), store.insert_job(limited, {})
    assert store.claim_job(instance).id == first
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        query(database, "UPDATE jobs SET status = 'Executing', slot = 0 WHERE id = ?", second)


def test_writes_hold_only_for_the_owner_while_its_lease_lasts(store, database, instance):
    t = template(store)
    job_id = store.insert_job(t, {})
    store.claim_job(instance)
    assert not store.append_logs(job_id, "instance-b", 0, [("INFO", "not mine")])
    assert not store.finish_job(job_id, "instance-b", "Succeeded", 0, [])
    assert store.append_logs(job_id, instance, 0, [("INFO", "mine")])
    query(database, "UPDATE instances SET lease_until = 0 WHERE id = ?", instance)  # the lease ran out
    assert not store.append_logs(job_id, instance, 1, [("INFO", "too late")])
    assert not store.finish_job(job_id, instance, "Succeeded", 1, [])
    assert query(database, "SELECT seq, message FROM logs") == [(0, "mine")]
    assert store.job_status(job_id) == "Executing"


def test_a_write_sent_again_after_its_answer_was_lost_stores_each_entry_once(store, database, instance):
    # A dropped connection can lose the answer to a write that was committed; the runner then sends the same
    # entries again, followed by those that came since, and at last its final status with all it still holds.
    t = template(store)
    job_id = store.insert_job(t, {})
    store.claim_job(instance)
    assert store.append_logs(job_id, instance, 0, [("INFO", "a"), ("INFO", "b")])
    assert store.append_logs(job_id, instance, 0, [("INFO", "a"), ("INFO", "b"), ("INFO", "c")])
    assert store.finish_job(job_id, instance, "Succeeded", 0, [("INFO", "a"), ("INFO", "b"), ("INFO", "c"),
                                                              ("INFO", "d")])
    assert query(database, "SELECT seq, message FROM logs ORDER BY seq") == [(0, "a"), (1, "b"), (2, "c"),
                                                                            (3, "d")]
    assert store.job_status(job_id) == "Succeeded"


@pytest.mark.alone
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_transaction_left_open_by_a_stopped_instance_frees_its_rows_after_a_quarter_of_the_lease(database):
    """A paused instance whose transaction was open held its job's row, and the instance ending its jobs
    waited for ever on it. Here a cancel stops between its UPDATE of the job and its COMMIT."""
    import psycopg

    store = server_module.open_store(database, server_module.Settings(database=database, lease=4))
    try:
        store.register_instance("instance-a", 60)
        job_id = store.insert_job(template(store), {})
        store.claim_job("instance-a")
        store.others_alive = True  # so that the cancel announces itself, inside its transaction
        announce, paused = store._announce, threading.Event()

        def pause_then_announce(db, events):
            paused.set()
            time.sleep(3)
            announce(db, events)

        store._announce = pause_then_announce
        outcome = []

        def cancel():
            try:
                outcome.append(store.cancel_job(job_id))
            except server_module.StoreError as error:
                outcome.append(error)

        canceling = threading.Thread(target=cancel)
        canceling.start()
        assert paused.wait(5)
        started = time.monotonic()
        with psycopg.connect(database, autocommit=True, options="-c lock_timeout=5000") as other:
            other.execute("UPDATE jobs SET status = 'Error' WHERE id = %s", (job_id,))  # waits for the row
        waited = time.monotonic() - started
        canceling.join(10)
        assert waited < 2, f"the row was held {waited:.1f} s: a quarter of the lease is 1 s"
        assert isinstance(outcome[0], server_module.StoreError), "the cancel failed, committing nothing"
        assert store.cancel_requests("instance-a") == [] and store.job_status(job_id) == "Error"
    finally:
        store.close()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_the_pool_lends_the_connection_returned_last(store):
    """So that the backends the load needs stay warm (see recent_first_pool_class). This fails if a later
    psycopg_pool no longer has what the pool class turns."""
    for returned_last in (0, 1, 2, 0):
        lends = [store._lend() for _ in range(3)]
        connections = [lend.__enter__() for lend in lends]
        order = [n for n in range(3) if n != returned_last] + [returned_last]
        for n in order:
            lends[n].__exit__(None, None, None)
        with store._lend() as db:
            assert db is connections[returned_last]
        assert store.pool.get_stats()["pool_size"] == 3, "no connection was added or lost"


def test_a_lease_renews_until_it_has_run_out(store, database, instance):
    assert store.renew_lease(instance, 60)
    query(database, "UPDATE instances SET lease_until = 0 WHERE id = ?", instance)
    assert not store.renew_lease(instance, 60), "a lease that ran out is never taken back"


def test_the_jobs_of_an_instance_whose_lease_ran_out_are_ended_and_free_their_slots(store, database, instance):
    limited = template(store, "limited", max_concurrent=1)
    running, waiting = store.insert_job(limited, {}), store.insert_job(limited, {})
    store.claim_job(instance)
    store.append_logs(running, instance, 0, [("INFO", "started")])
    noted_by_an_earlier_version = "INSERT INTO process_groups (job_id, process_group) VALUES (?, ?)"
    query(database, noted_by_an_earlier_version, running, 4242)
    assert store.orphaned_jobs() == []
    query(database, "UPDATE instances SET lease_until = 0 WHERE id = ?", instance)
    [(job_id, owner, group, _boot)] = store.orphaned_jobs()
    assert (job_id, owner, group) == (running, instance, 4242)
    store.register_instance("instance-b", 60)
    assert store.end_orphaned_job(running, owner, "it stopped")
    assert not store.end_orphaned_job(running, owner, "it stopped"), "ended once"
    assert query(database, "SELECT seq, level, message FROM logs WHERE job_id = ?", running) == [
        (0, "INFO", "started"), (1, "ERROR", "it stopped")]
    assert store.job_status(running) == "Error"
    assert store.claim_job("instance-b").id == waiting, "its slot is free again"
    query(database, noted_by_an_earlier_version, waiting, 4343)
    store.forget_process_groups()
    assert query(database, "SELECT job_id, process_group FROM process_groups") == [(waiting, 4343)], \
        "the sweep forgets the notes of jobs no longer Executing"


def test_cancel_ends_a_pending_job_and_marks_an_executing_one(store, instance):
    t = template(store)
    executing, pending = store.insert_job(t, {}), store.insert_job(t, {})
    store.claim_job(instance)
    assert store.cancel_job(pending) == "canceled"
    assert store.job_status(pending) == "Error"
    assert store.get_job(pending).log_count == 1
    assert store.cancel_job(executing) == "requested"
    assert store.cancel_requests(instance) == [executing]
    assert store.cancel_job(pending) == "Error", "a final job is left as it was"
    assert store.cancel_job(999999) is None


def test_the_listener_hears_each_commit(store, instance):
    t = template(store)
    job_id = store.insert_job(t, {})
    store.claim_job(instance)
    store.append_logs(job_id, instance, 0, [("INFO", "a"), ("INFO", "b")])
    store.finish_job(job_id, instance, "Warning", 2, [("WARN", "c")])
    Event, Progress = server_module.StoreEvent, server_module.Progress
    assert [event for event in store.events if event.kind != "resync"] == [
        Event("work", job_id), Event("job", job_id, Progress("Executing", 2)), Event("job", job_id, Progress("Warning", 3))]


def test_a_job_that_frees_a_slot_tells_the_workers_there_is_work(store, instance):
    limited = template(store, "limited", max_concurrent=1)
    job_id = store.insert_job(limited, {})
    store.claim_job(instance)
    store.events.clear()
    store.finish_job(job_id, instance, "Succeeded", 0, [])
    assert [event.kind for event in store.events if event.kind != "resync"] == ["job", "work"]


def test_logs_are_read_in_chunks_of_the_count_asked(store, instance):
    t = template(store)
    job_id = store.insert_job(t, {})
    store.claim_job(instance)
    store.append_logs(job_id, instance, 0, [("INFO", f"line {n}") for n in range(25)])
    chunks = list(store.read_logs(job_id, 3, 23, chunk_rows=10))
    assert len(chunks) == 2 and "".join(chunks) == "".join(f"INFO: line {n}\n" for n in range(3, 23))
    assert store.read_logs(job_id, 20, 25) == "".join(f"INFO: line {n}\n" for n in range(20, 25))
    assert store.read_logs(job_id, 25, 25) == ""


def test_a_closed_or_unreachable_store_fails_with_its_own_error(database, tmp_path):
    store = server_module.open_store(database)
    store.close()
    with pytest.raises(server_module.StoreError):
        store.count_jobs("Pending")
    with pytest.raises(server_module.StoreError, match="(?i)connect|refused|answer"):
        server_module.open_store("postgresql://nobody@127.0.0.1:9/none", server_module.Settings(busy_timeout=1))


# The schema of the first release, which databases in use may still have: app.py brings them up to date.
FIRST_SCHEMA = """
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS template_versions (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    definition  TEXT NOT NULL,
    key_digest  TEXT NOT NULL DEFAULT '',
    UNIQUE (name, definition, key_digest)
);
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    template_version INTEGER NOT NULL REFERENCES template_versions (id),
    template         TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('Pending', 'Executing', 'Succeeded', 'Warning', 'Error')),
    variables        TEXT NOT NULL,
    process_group    INTEGER,
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status, id) WHERE status IN ('Pending', 'Executing');
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS logs (
    job_id  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    level   TEXT NOT NULL CHECK (level IN ('DEBUG', 'INFO', 'WARN', 'ERROR')),
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

FIRST_SCHEMA_JOBS = [
    # id, status, variables (the secret Pw kept inside them, as the first schema did until a job was final)
    (1, "Succeeded", {"Name": "a"}),
    (2, "Pending", {"Name": "b", "Pw": "pending-secret"}),
    (3, "Executing", {"Name": "c", "Pw": "running-secret"}),
]


def first_schema_database(path, definition: dict, jobs) -> None:
    """A SQLite file as the first release left it: one template version and these (id, status, variables)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(FIRST_SCHEMA)
        db.execute("INSERT INTO template_versions (id, name, definition) VALUES (1, 't', ?)", (json.dumps(definition),))
        for job_id, status, variables in jobs:
            db.execute("INSERT INTO jobs (id, template_version, template, status, variables, created_at)"
                       " VALUES (?, 1, 't', ?, ?, 0)", (job_id, status, json.dumps(variables)))
        db.commit()


def test_a_database_of_the_first_schema_is_brought_up_to_date(tmp_path):
    path = tmp_path / "jobs.db"
    definition = {"max_concurrent": 1, "variables": {"Name": "", "Pw": {"secret": True}}, "steps": [{"log": "x"}]}
    first_schema_database(path, definition, FIRST_SCHEMA_JOBS)
    store = server_module.open_store(str(path))
    try:
        rows = query(path, "SELECT id, variables, secrets, max_concurrent FROM jobs ORDER BY id")
        assert rows == [(1, '{"Name": "a", "Pw": null}', None, 1),
                        (2, '{"Name": "b", "Pw": null}', '{"Pw": "pending-secret"}', 1),
                        (3, '{"Name": "c", "Pw": null}', '{"Pw": "running-secret"}', 1)]
        store.register_instance("new", 60)
        assert [row[0] for row in store.orphaned_jobs()] == [3], "a job left Executing by the old server is ended"
        assert store.claim_job("new").variables == {"Name": "b", "Pw": "pending-secret"}
        assert query(path, "PRAGMA user_version") == [(server_module.SCHEMA_VERSION,)]
    finally:
        store.close()
    server_module.open_store(str(path)).close()  # a second start finds it up to date


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # the first schema was SQLite's only
def test_a_pending_job_of_a_stored_version_with_a_long_default_runs_after_an_upgrade(make_app, database):
    """Defaults over 8 KiB are refused in templates.toml now; a version stored before, with its Pending jobs,
    must still run them (its default is not used: the job's values were resolved when it was triggered)."""
    definition = {"variables": {"Blob": "x" * 9000}, "steps": [{"run": 'echo "len=${#Blob}"'}]}
    first_schema_database(database, definition, [(1, "Pending", {"Blob": "x" * 9000})])
    client = make_app('[t]\n[t.variables]\nBlob = "short"\n[[t.steps]]\nrun = \'echo "len=${#Blob}"\'\n')
    assert final_status(client, "1") == "Succeeded"
    assert logs_of(client, "1") == "INFO: len=9000\n"

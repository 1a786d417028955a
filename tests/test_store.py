"""The job store and the runner's use of it, in-process: group commit under concurrent writers (the turn
held, passed on, ended; one failing write in a batch), close, and a worker that cannot read its job."""

import sqlite3
import threading

import pytest

import app as server_module
from conftest import final_status, wait_for

TEMPLATES = """
[hello]
[hello.variables]
Big = ""
[[hello.steps]]
log = "hi"

[echo]
[echo.variables]
Word = ""
[[echo.steps]]
run = 'printf "%s\\n" "${#Word}:$(printf "%s" "$Word" | cut -c1-3)"'

[block]
max_concurrent = 1
[block.variables]
Fifo = ""
[[block.steps]]
run = 'echo started; read line < "$Fifo"'
"""


@pytest.fixture
def store(tmp_path):
    store = server_module.JobStore(tmp_path / "jobs.db")
    yield store
    store.close()


def test_concurrent_writes_all_commit_and_run_their_callbacks_in_id_order(store, tmp_path):
    template = server_module.parse_template("t", {"steps": [{"log": "x"}]}, "t")
    version = store.save_template_version("t", template.definition, "")
    template = server_module.dataclasses.replace(template, version=version)
    committed, returned, failures = [], [], []

    def writer():
        try:
            for _ in range(50):
                returned.append(store.insert_job(template, {}, then=committed.append))
        except Exception as error:  # reported below, not lost in the thread
            failures.append(error)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert sorted(returned) == committed == list(range(1, 401))
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (400,)


def hold_the_turn(store):
    """Start a write that keeps the committer's turn until the returned event is set; returns (event, thread)
    once the turn is taken."""
    inside, release = threading.Event(), threading.Event()

    def slow(db):
        inside.set()
        release.wait(30)

    thread = threading.Thread(target=store._write, args=(slow,))
    thread.start()
    assert inside.wait(30)
    return release, thread


def count_versions(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM template_versions").fetchone()[0]


def test_writes_queued_behind_a_commit_are_all_committed_each_waking_its_own_writer(store, tmp_path):
    release, holder = hold_the_turn(store)
    results, threads = {}, []
    for number in range(6):  # they queue behind the held turn, each waiting for its own write
        thread = threading.Thread(
            target=lambda n=number: results.__setitem__(n, store.save_template_version(f"t{n}", "{}", ""))
        )
        thread.start()
        threads.append(thread)
    store._write_later(lambda db: db.execute(
        "INSERT INTO template_versions (name, definition) VALUES ('later', '{}')"))
    wait_for(lambda: len(store._queue) == 7, what="the writes to queue")
    assert not results  # nothing is committed while the turn is held
    release.set()
    for thread in threads + [holder]:
        thread.join(30)
    assert sorted(results) == list(range(6)) and len(set(results.values())) == 6
    wait_for(lambda: count_versions(tmp_path / "jobs.db") == 7, what="the queued-and-forgotten write")
    assert not store._committing and not store._queue  # the turn ended with the queue empty


def test_a_write_queued_and_forgotten_is_committed_by_whoever_holds_the_turn(store, tmp_path):
    release, holder = hold_the_turn(store)
    for number in range(3):  # nobody waits for these: the holder must commit them before its turn ends
        store._write_later(lambda db, n=number: db.execute(
            "INSERT INTO template_versions (name, definition) VALUES (?, '{}')", (f"later{n}",)))
    release.set()
    holder.join(30)
    assert count_versions(tmp_path / "jobs.db") == 3
    assert not store._committing


def test_one_failing_write_does_not_fail_the_others_of_its_batch(store, tmp_path):
    release, holder = hold_the_turn(store)
    outcomes = {}

    def write(name, operation):
        try:
            outcomes[name] = store._write(operation)
        except Exception as error:  # the failing one: its own error, and only its own
            outcomes[name] = error

    def bad(db):
        db.execute("INSERT INTO template_versions (id, name, definition) VALUES (1, 'x', '{}')")
        db.execute("INSERT INTO template_versions (id, name, definition) VALUES (1, 'y', '{}')")  # same id

    def good(name):
        return lambda db: db.execute("INSERT INTO template_versions (name, definition) VALUES (?, '{}')",
                                     (name,)).lastrowid

    threads = [threading.Thread(target=write, args=("before", good("before"))),
               threading.Thread(target=write, args=("bad", bad)),
               threading.Thread(target=write, args=("after", good("after")))]
    for thread in threads:
        thread.start()
        wait_for(lambda: len(store._queue) == threads.index(thread) + 1, what="the write to queue")
    release.set()
    for thread in threads + [holder]:
        thread.join(30)
    assert isinstance(outcomes["bad"], sqlite3.IntegrityError)
    assert isinstance(outcomes["before"], int) and isinstance(outcomes["after"], int)
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        names = {row[0] for row in db.execute("SELECT name FROM template_versions")}
    assert names == {"before", "after"}  # the bad write left nothing behind, the others are all there


def test_an_interrupt_during_a_commit_fails_its_batch_and_frees_the_turn(store, tmp_path):
    """A Ctrl-C (KeyboardInterrupt) that lands in the main thread while it commits: its batch fails, the
    others' writes report it, and the store goes on working (no turn left held, no transaction left open)."""
    inside, release = threading.Event(), threading.Event()

    def interrupted(db):
        db.execute("INSERT INTO template_versions (name, definition) VALUES ('lost', '{}')")
        inside.set()
        release.wait(30)
        raise KeyboardInterrupt

    raised, outcome = [], {}

    def committer():
        try:
            store._write(interrupted)
        except BaseException as error:  # noqa: B036 - the point of the test
            raised.append(error)

    def other():
        try:
            outcome["other"] = store.save_template_version("other", "{}", "")
        except sqlite3.Error as error:
            outcome["other"] = error

    first = threading.Thread(target=committer)
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=other)
    second.start()
    wait_for(lambda: len(store._queue) == 1, what="the second write to queue")
    release.set()
    first.join(30)
    second.join(30)
    assert not second.is_alive()
    assert isinstance(raised[0], KeyboardInterrupt)
    # The second write was in a later batch (committed with the turn passed to it) or in the failed one.
    if isinstance(outcome["other"], sqlite3.Error):
        assert "interrupted" in str(outcome["other"])
    assert not store._committing and not store._writer.in_transaction
    assert isinstance(store.save_template_version("after", "{}", ""), int)
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        names = {row[0] for row in db.execute("SELECT name FROM template_versions")}
    assert "lost" not in names and "after" in names


def test_close_waits_for_the_commit_under_way_and_commits_what_is_queued(tmp_path):
    store = server_module.JobStore(tmp_path / "jobs.db")
    release, holder = hold_the_turn(store)
    waiter = threading.Thread(target=store.save_template_version, args=("queued", "{}", ""))
    waiter.start()
    wait_for(lambda: len(store._queue) == 1, what="the write to queue")
    closer = threading.Thread(target=store.close)
    closer.start()
    wait_for(lambda: store._closed, what="close to begin")
    assert closer.is_alive()  # it waits for the turn to end
    with pytest.raises(sqlite3.OperationalError, match="closed"):
        store.save_template_version("too late", "{}", "")
    release.set()
    for thread in (holder, waiter, closer):
        thread.join(30)
        assert not thread.is_alive()
    assert count_versions(tmp_path / "jobs.db") == 1


def test_a_write_after_close_fails_with_a_clear_error(tmp_path):
    store = server_module.JobStore(tmp_path / "jobs.db")
    store.close()
    with pytest.raises(sqlite3.OperationalError, match="closed"):
        store.save_template_version("t", "{}", "")


def test_a_worker_that_cannot_read_its_job_puts_it_back_and_stays_alive(make_app, tmp_path, monkeypatch):
    client = make_app(TEMPLATES, WORKERS=2)
    runner = client.app.extensions["job_runner"]
    store = client.app.extensions["job_store"]
    read = store.pending_variables
    failed = []

    def fail_once(job_id):
        if not failed:
            failed.append(job_id)
            raise sqlite3.OperationalError("disk I/O error")
        return read(job_id)

    class Backoff(threading.Event):
        """The runner's stop event, whose backoff waits are short and counted."""
        waits = 0

        def wait(self, timeout=None):
            result = super().wait(timeout if timeout is None else min(timeout, 0.2))
            Backoff.waits += 1
            return result

    monkeypatch.setattr(runner, "stopping", Backoff())
    monkeypatch.setattr(store, "pending_variables", fail_once)
    # Variables this large are not kept in the queue: the worker reads them from the store.
    token = client.get("/api/jobs/trigger", {"template": "hello", "Big": "x" * 5000}).text
    wait_for(lambda: failed, what="the failed read")
    # Another trigger wakes the other worker while the first one backs off: it may take the job back.
    other = client.get("/api/jobs/trigger", {"template": "hello"}).text
    assert final_status(client, token) == "Succeeded"  # run again after the failed read
    assert final_status(client, other) == "Succeeded"
    assert failed == [int(token)]
    wait_for(lambda: Backoff.waits, what="the worker's backoff to end")

    # The bookkeeping survived: a running job is found by cancel, every worker is alive.
    fifo = tmp_path / "fifo"
    server_module.os.mkfifo(fifo)
    blocked = client.get("/api/jobs/trigger", {"template": "block", "Fifo": str(fifo)}).text
    wait_for(lambda: client.get("/api/jobs/logs", {"token": blocked}).text == "INFO: started\n",
             what="the blocking job to start")
    assert client.get("/api/jobs/cancel", {"token": blocked}).text == "Error"
    assert all(thread.is_alive() for thread in runner.threads)
    assert client.get("/api/jobs/logs", {"token": blocked}).text.endswith("ERROR: Job canceled\n")


@pytest.mark.parametrize("size, read_back", [(10, False), (5000, True)])
def test_a_job_gets_its_variables_whether_the_queue_kept_them_or_not(make_app, monkeypatch, size, read_back):
    client = make_app(TEMPLATES, WORKERS=1)
    store = client.app.extensions["job_store"]
    read, reads = store.pending_variables, []
    monkeypatch.setattr(store, "pending_variables", lambda job_id: reads.append(job_id) or read(job_id))
    word = "abc" + "d" * (size - 3)
    token = client.get("/api/jobs/trigger", {"template": "echo", "Word": word}).text
    assert final_status(client, token) == "Succeeded"
    assert client.get("/api/jobs/logs", {"token": token}).text == f"INFO: {size}:abc\n"
    assert reads == ([int(token)] if read_back else [])

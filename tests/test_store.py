"""The job store and the runner's use of it, in-process: group commit under concurrent writers, writes
after close, and a worker that cannot read its job."""

import sqlite3
import threading

import pytest

import app as server_module
from conftest import final_status, wait_for

TEMPLATES = """
[hello]
[[hello.steps]]
log = "hi"

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
    token = client.get("/api/jobs/trigger", {"template": "hello"}).text
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

"""Storage faults against a real server (issue 3): a database locked by another program, and a full disk.

For the full disk the database lives on a small tmpfs that the test mounts and fills; where mounting is not
allowed (not root, no tmpfs) the test is skipped with the reason.
"""

import errno
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import job_count, logs, query, status_word, wait_for

TEMPLATES = """
[quick]
[[quick.steps]]
log = "done"

[chatty]
[[chatty.steps]]
# A line every 50 ms until chatty.go exists, then how many there were.
run = '''echo $$ > chatty.pid; i=0
while [ ! -e chatty.go ]; do echo "line $i"; i=$((i+1)); sleep 0.05; done; echo "lines: $i"'''

[flood]
[[flood.steps]]
run = 'echo $$ > flood.pid; seq 1 150000; sleep 30'
"""


#
# A database locked by another program: writes wait --busy-timeout, then 503; reads go on.
#

LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
db.close()
"""


def test_locked_database_answers_503_then_recovers(start_server):
    server = start_server(TEMPLATES, "--busy-timeout", "0.5")
    before = server.trigger("quick")
    assert server.final_status(before) == "Succeeded"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(server.db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        started = time.monotonic()
        status, body, headers = server.get("/api/jobs/trigger", template="quick")
        elapsed = time.monotonic() - started
        assert status == 503, body
        assert 0.45 <= elapsed < 5, f"the 503 took {elapsed:.1f} s with --busy-timeout 0.5"
        assert "Traceback" not in body and len(body) < 300 and body.strip(), body
        assert re.search(r"store|database|storage", body, re.I), body
        # Reads go on while another program holds the write lock (WAL).
        assert status_word(server, before) == "Succeeded"
        assert logs(server, before) == "INFO: done\n"
    finally:
        locker.communicate("release\n", timeout=10)
    assert locker.returncode == 0
    after = server.trigger("quick")
    assert after == str(int(before) + 1), "the refused trigger left no job behind"
    assert server.final_status(after) == "Succeeded"
    assert logs(server, after) == "INFO: done\n"
    assert "Traceback" not in server.stderr()
    assert server.stop() == 0


#
# A full disk.
#


@pytest.fixture(params=["4m"])
def small_disk(tmp_path, request):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path):
    """Write zeros to path until the file system is full. Unbuffered: the part of the last write that did not fit
    must not wait in a buffer, whose flush at close would fail again."""
    with open(path, "wb", buffering=0) as file:
        chunk = b"\0" * 65536
        try:
            for _ in range(10_000):  # bounded: 640 MiB, far more than the 4 MiB disk
                file.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC
            return
    raise AssertionError("the disk never filled")


def test_disk_full_refuses_triggers_keeps_reads_and_recovers(small_disk, start_server):
    server = start_server(TEMPLATES, db=small_disk / "jobs.db")
    done = server.trigger("quick")
    assert server.final_status(done) == "Succeeded"
    chatty = server.trigger("chatty")
    status, _, headers = server.get("/api/jobs/logs", token=chatty, offset=0, wait=10)
    assert status == 200 and int(headers["X-Log-Offset"]) >= 1

    fill(small_disk / "filler")
    status, body, headers = server.get("/api/jobs/trigger", template="quick")
    assert status == 503, body
    assert "full" in body and "Retry-After" in headers
    # Reads of existing jobs go on; the health check says what is wrong.
    assert server.get("/api/jobs/status", token=done)[:2] == (200, "Succeeded")
    assert server.get("/api/jobs/logs", token=done)[:2] == (200, "INFO: done\n")
    status, body, _ = server.get("/healthz")
    assert status == 503 and "cannot be written" in body and "full" in body, body

    # The chatty job goes on meanwhile, its lines kept in memory until they can be stored.
    pid = int((server.directory / "chatty.pid").read_text())
    assert os.path.exists(f"/proc/{pid}")
    (small_disk / "filler").unlink()
    again = server.trigger("quick")
    assert server.final_status(again) == "Succeeded"
    (server.directory / "chatty.go").touch()
    assert server.final_status(chatty) == "Succeeded"
    lines = logs(server, chatty).splitlines()  # every line printed, in order, none lost while the disk was full
    printed = int(lines[-1].removeprefix("INFO: lines: "))
    assert lines == [f"INFO: line {i}" for i in range(printed)] + [f"INFO: lines: {printed}"], lines
    wait_for(lambda: server.get("/healthz")[:2] == (200, "ok"), 10, what="the health check to recover")
    # Nothing half-written: exactly the jobs whose trigger answered 200 exist.
    assert job_count(server) == 3
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("small_disk", ["64m"], indirect=True)
def test_a_job_whose_unstored_log_grows_past_its_bound_is_stopped(small_disk, start_server):
    server = start_server(TEMPLATES, db=small_disk / "jobs.db")
    flood = server.trigger("flood")
    status, _, headers = server.get("/api/jobs/logs", token=flood, offset=0, wait=10)
    fill(small_disk / "filler")
    pid = int((server.directory / "flood.pid").read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=20, what="the flooding job to be stopped")
    stored_before = int(server.get("/api/jobs/logs", token=flood, offset=10**9)[2]["X-Log-Offset"])
    (small_disk / "filler").unlink()
    assert server.final_status(flood) == "Error"
    lines = logs(server, flood).splitlines()
    stop = next(n for n, line in enumerate(lines) if line.startswith("ERROR: Could not store the job's log"
                                                                       " (database or disk is full) while"))
    output = [n for n, line in enumerate(lines) if line.startswith("INFO: ")]
    assert len(output) - stored_before <= 100_000, "no more than 100,000 entries waited in memory"
    assert output[-1] < stop, "nothing of the output was kept after the job was stopped"
    assert re.fullmatch(r"WARN: \d+ entries of output were dropped while the log could not be stored",
                        lines[-1]), lines[-3:]
    assert "Traceback" not in server.stderr()


def test_an_instance_that_cannot_renew_its_lease_stops_its_jobs(small_disk, start_server):
    """With --lease 1, an instance that cannot write for 0.75 s kills its jobs' processes before its lease runs
    out; once the store is back, it serves as a new instance and the job ends in Error saying why."""
    server = start_server(TEMPLATES, "--lease", "1", db=small_disk / "jobs.db")
    chatty = server.trigger("chatty")
    server.get("/api/jobs/logs", token=chatty, offset=0, wait=10)
    pid = int((server.directory / "chatty.pid").read_text())
    fill(small_disk / "filler")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the job's shell to be killed")
    # The store stays full until the lease has run out by the database's clock, so that the job is ended by
    # the sweep of the instance serving anew, not by its own late write while the lease still held.
    wait_for(lambda: not query(server, "SELECT 1 FROM instances WHERE lease_until > "
                                       "(julianday('now') - 2440587.5) * 86400.0"),
             timeout=5, what="the lease to run out")
    (small_disk / "filler").unlink()
    assert server.final_status(chatty) == "Error"
    log = server.get("/api/jobs/logs", token=chatty)[1]
    assert "could not renew its lease" not in log and "stopped renewing its lease" in log, log
    assert server.final_status(server.trigger("quick")) == "Succeeded"
    wait_for(lambda: "lease ran out; serving as a new instance" in server.stderr(), 5, what="the new lease's line")
    assert "Traceback" not in server.stderr()

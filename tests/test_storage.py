"""Storage faults against a real server: a full disk (issue 3). A database locked by another program is in
test_server.py.

The database lives on a small tmpfs that the test mounts and fills; where mounting is not allowed (not root,
no tmpfs) the test is skipped with the reason.
"""

import errno
import os
import sqlite3
import subprocess

import pytest

from conftest import wait_for

TEMPLATES = """
[quick]
[[quick.steps]]
log = "done"

[chatty]
[[chatty.steps]]
run = 'echo $$ > chatty.pid; i=0; while [ $i -lt 400 ]; do echo "line $i"; i=$((i+1)); sleep 0.05; done'
"""


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path):
    """Write zeros to path until the file system is full."""
    with open(path, "wb") as file:
        chunk = b"\0" * 65536
        try:
            for _ in range(10_000):  # bounded: 640 MiB, far more than the 4 MiB disk
                file.write(chunk)
                file.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
            return
    raise AssertionError("the disk never filled")


def job_count(db):
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT count(*) FROM jobs").fetchone()[0]


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
    # Reads of existing jobs go on.
    assert server.get("/api/jobs/status", token=done)[:2] == (200, "Succeeded")
    assert server.get("/api/jobs/logs", token=done)[:2] == (200, "INFO: done\n")

    # The chatty job cannot store its next lines: the runner stops it (its shell is killed).
    pid = int((server.directory / "chatty.pid").read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the chatty job's shell to be killed")
    assert server.get("/api/jobs/status", token=chatty)[1] == "Executing"  # ends only when it can be stored

    (small_disk / "filler").unlink()
    again = server.trigger("quick")
    assert server.final_status(again) == "Succeeded"
    # The job whose log could not be written ends in Error, saying why, once storage is back.
    assert server.final_status(chatty) == "Error"
    log = server.get("/api/jobs/logs", token=chatty)[1]
    assert "ERROR: Could not store the job's log (database or disk is full)" in log
    # Nothing half-written: exactly the jobs whose trigger answered 200 exist.
    assert job_count(small_disk / "jobs.db") == 3
    assert "Traceback" not in server.stderr()

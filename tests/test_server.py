"""A real `python app.py` on loopback: start-up errors, restart recovery, timeouts, orphans, limits, storage
faults and job control (issue 2's start-up and recovery rules, issue 3, issue 4 with real processes).

Every server gets a short --grace so that a test that fails half-way still tears down in a second."""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT, alive, assert_gone, logs, read_pid, status_word, wait_for, wait_for_log

GRACE = ("--grace", "0.5")


#
# Helpers.
#


def run_app(*args, timeout=30):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


#
# Start-up errors.
#

GOOD_TEMPLATES = """
[hello]
[[hello.steps]]
log = "hi"
"""


def assert_one_clear_line(result, *needles):
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    assert result.stdout == "", "nothing may be served"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_malformed_toml_names_file_and_line(tmp_path):
    templates = tmp_path / "broken.toml"
    templates.write_text('[hello]\ndescription = "fine"\n\n[[hello.steps]\nlog = "hi"\n')
    result = run_app("--port", "0", "--templates", str(templates), "--db", str(tmp_path / "jobs.db"))
    line = assert_one_clear_line(result, str(templates))
    assert re.search(r"line 4\b", line), line


@pytest.mark.parametrize("toml, field", [
    ('[hello]\ncolour = "red"\n[[hello.steps]]\nlog = "x"\n', "colour"),
    ('[hello]\n[[hello.steps]]\nlog = "x"\nrun = "true"\n', "steps[0]"),
    ('[hello]\n[[hello.steps]]\nlog = "x"\nlevel = "LOUD"\n', "level"),
    ('[hello]\n[hello.variables]\nA = { pattern = "(" }\n[[hello.steps]]\nlog = "x"\n', "pattern"),
    ('[hello]\n[[hello.steps]]\nlog = "$Nowhere"\n', "Nowhere"),
])
def test_invalid_template_field_is_named(tmp_path, toml, field):
    templates = tmp_path / "templates.toml"
    templates.write_text(toml)
    result = run_app("--port", "0", "--templates", str(templates), "--db", str(tmp_path / "jobs.db"))
    assert_one_clear_line(result, "hello", field)


@pytest.mark.parametrize("where", ["missing-directory", "directory"])
def test_unwritable_database_path(tmp_path, where):
    templates = tmp_path / "templates.toml"
    templates.write_text(GOOD_TEMPLATES)
    db = tmp_path / "no" / "such" / "dir" / "jobs.db" if where == "missing-directory" else tmp_path
    result = run_app("--port", "0", "--templates", str(templates), "--db", str(db))
    assert_one_clear_line(result, str(db))


def test_port_in_use(tmp_path):
    templates = tmp_path / "templates.toml"
    templates.write_text(GOOD_TEMPLATES)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app("--port", str(port), "--templates", str(templates), "--db", str(tmp_path / "jobs.db"))
    assert_one_clear_line(result, str(port))


def test_help_exits_zero():
    result = run_app("--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--templates", "--db", "--workers", "--grace", "--max-body",
                   "--max-pending", "--keep-days"):
        assert option in result.stdout


#
# Restart recovery.
#

RECOVERY_TEMPLATES = """
[block]
[block.variables]
Dir = ""
[[block.steps]]
run = 'sleep 300 & echo $! > "$Dir/grandchild"; echo $$ > "$Dir/child"; echo started; wait'

[quick]
[[quick.steps]]
run = 'echo "quick ran"'
"""


def test_restart_ends_executing_in_error_and_runs_pending(start_server, tmp_path, leftovers):
    server = start_server(RECOVERY_TEMPLATES, "--workers", "1", *GRACE)
    executing = server.trigger("block", Dir=str(tmp_path))
    wait_for_log(server, executing, "started")
    pending = server.trigger("quick")
    assert status_word(server, executing) == "Executing"
    assert status_word(server, pending) == "Pending"
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    leftovers += [child, grandchild]

    server.kill()
    assert alive(child) and alive(grandchild), "a killed server cannot clean up: the restart has to"

    again = start_server(RECOVERY_TEMPLATES, "--workers", "1", *GRACE, db=server.db)
    assert again.final_status(executing, timeout=10) == "Error"
    lines = logs(again, executing).splitlines()
    assert lines[0] == "INFO: started"
    assert len(lines) == 2 and re.match(r"ERROR: .*server (stopped|restarted).* while", lines[1], re.I), lines
    assert_gone(child, grandchild)

    assert again.final_status(pending, timeout=10) == "Succeeded"
    assert logs(again, pending) == "INFO: quick ran\n"
    assert again.stop() == 0


#
# Timeouts kill the whole process group.
#

TIMEOUT_TEMPLATES = """
[step_timeout]
[step_timeout.variables]
Dir = ""
[[step_timeout.steps]]
run = 'sleep 300 & echo $! > "$Dir/grandchild"; echo $$ > "$Dir/child"; echo started; sleep 300'
timeout = 1
[[step_timeout.steps]]
log = "never logged"

[job_timeout]
timeout = 1
[job_timeout.variables]
Dir = ""
[[job_timeout.steps]]
log = "first step"
[[job_timeout.steps]]
run = 'sleep 300 & echo $! > "$Dir/grandchild"; echo $$ > "$Dir/child"; echo started; sleep 300'
timeout = 60
[[job_timeout.steps]]
log = "never logged"
"""


@pytest.mark.parametrize("template, first_lines, reason", [
    ("step_timeout", ["INFO: started"], r"ERROR: Step timed out"),
    ("job_timeout", ["INFO: first step", "INFO: started"], r"ERROR: Job timed out"),
])
def test_timeout_kills_child_and_grandchild(start_server, tmp_path, leftovers, template, first_lines, reason):
    server = start_server(TIMEOUT_TEMPLATES, *GRACE)
    started = time.monotonic()
    token = server.trigger(template, Dir=str(tmp_path))
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    leftovers += [child, grandchild]
    assert server.final_status(token, timeout=20) == "Error"
    assert time.monotonic() - started < 8, "a 1 s timeout"
    assert_gone(child, grandchild)
    lines = logs(server, token).splitlines()
    assert lines[:-1] == first_lines, lines
    assert re.match(reason, lines[-1]), lines
    assert server.stop() == 0


#
# No orphans after a step exits.
#

ORPHAN_TEMPLATES = """
[detached]
[detached.variables]
Dir = ""
[[detached.steps]]
run = 'sleep 300 >/dev/null 2>&1 & echo $! > "$Dir/background"; echo done'

[holds_output]
[holds_output.variables]
Dir = ""
[[holds_output.steps]]
run = 'sleep 300 & echo $! > "$Dir/background"; echo done'
[[holds_output.steps]]
log = "next step"
"""


def test_background_child_killed_when_step_exits(start_server, tmp_path, leftovers):
    server = start_server(ORPHAN_TEMPLATES, *GRACE)
    token = server.trigger("detached", Dir=str(tmp_path))
    background = read_pid(tmp_path / "background")
    leftovers.append(background)
    assert server.final_status(token) == "Succeeded"
    assert logs(server, token) == "INFO: done\n"
    assert_gone(background)
    assert server.stop() == 0


def test_background_child_holding_output_is_killed_with_a_warning(start_server, tmp_path, leftovers):
    server = start_server(ORPHAN_TEMPLATES, *GRACE)
    started = time.monotonic()
    token = server.trigger("holds_output", Dir=str(tmp_path))
    background = read_pid(tmp_path / "background")
    leftovers.append(background)
    assert server.final_status(token, timeout=15) == "Warning"
    assert time.monotonic() - started < 10, "the leftover grace is short"
    assert_gone(background)
    lines = logs(server, token).splitlines()
    assert lines[0] == "INFO: done" and lines[-1] == "INFO: next step", lines
    warnings = [line for line in lines if line.startswith("WARN: ")]
    assert len(warnings) == 1 and len(lines) == 3, lines
    assert server.stop() == 0


#
# Limits.
#

LIMIT_TEMPLATES = """
[hello]
[hello.variables]
Pad = ""
[[hello.steps]]
log = "hi"

[gate]
[gate.variables]
Dir = ""
[[gate.steps]]
run = 'echo started; while [ ! -e "$Dir/go" ]; do sleep 0.02; done'

[chatty]
max_log_bytes = 1000
[[chatty.steps]]
run = 'seq 1 100000'
[[chatty.steps]]
log = "after the flood"
"""


def test_max_body(start_server):
    server = start_server(LIMIT_TEMPLATES, "--max-body", "100", *GRACE)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    fits = "template=hello&Pad=" + "x" * (100 - len("template=hello&Pad="))
    status, token, _ = server.request("POST", "/api/jobs/trigger", body=fits, headers=form)
    assert status == 200, f"a body of exactly --max-body bytes is allowed: {token}"
    assert server.final_status(token) == "Succeeded"
    for size in (101, 5000):
        status, body, _ = server.request("POST", "/api/jobs/trigger", body=fits + "x" * (size - 100), headers=form)
        assert status == 413, body
        assert "large" in body.lower() and "Traceback" not in body, body
    assert server.stop() == 0


def test_max_pending_answers_503_with_retry_after(start_server, tmp_path):
    server = start_server(LIMIT_TEMPLATES, "--workers", "1", "--max-pending", "2", *GRACE)
    gate = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, gate, "started")
    queued = [server.trigger("hello"), server.trigger("hello")]
    status, body, headers = server.get("/api/jobs/trigger", template="hello")
    assert status == 503, body
    assert int(headers["Retry-After"]) > 0
    assert "queue" in body.lower() or "pending" in body.lower(), body
    (tmp_path / "go").touch()
    for token in [gate, *queued]:
        assert server.final_status(token) == "Succeeded"
    assert status_word(server, server.trigger("hello")) in ("Pending", "Executing", "Succeeded")
    assert server.stop() == 0


def test_max_log_bytes_bounds_the_stored_log(start_server):
    server = start_server(LIMIT_TEMPLATES, *GRACE)
    token = server.trigger("chatty")
    assert server.final_status(token, timeout=30) == "Warning"
    lines = logs(server, token).splitlines()

    kept, used = [], 0
    for number in range(1, 100001):
        if used + len(str(number)) > 1000:
            break
        used += len(str(number))
        kept.append(f"INFO: {number}")
    dropped_lines = 100000 - len(kept)
    dropped_bytes = sum(len(str(n)) for n in range(len(kept) + 1, 100001))

    assert lines[:len(kept)] == kept
    rest = lines[len(kept):]
    assert "INFO: after the flood" in rest, "the job goes on after the limit"
    warnings = [line for line in rest if line.startswith("WARN: ")]
    assert len(warnings) == 1 and len(rest) == 2, rest
    assert str(dropped_bytes) in warnings[0] or str(dropped_bytes + dropped_lines) in warnings[0], warnings
    assert server.stop() == 0


#
# Storage faults.
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
    server = start_server(LIMIT_TEMPLATES, *GRACE)
    before = server.trigger("hello")
    assert server.final_status(before) == "Succeeded"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(server.db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        started = time.monotonic()
        status, body, headers = server.get("/api/jobs/trigger", template="hello")
        elapsed = time.monotonic() - started
        assert status == 503, body
        assert elapsed < 15, f"the 503 took {elapsed:.1f} s"
        assert "Traceback" not in body and len(body) < 300 and body.strip(), body
        assert re.search(r"store|database|storage", body, re.I), body
        # Reads go on while another program holds the write lock (WAL).
        assert status_word(server, before) == "Succeeded"
        assert logs(server, before) == "INFO: hi\n"
    finally:
        locker.communicate("release\n", timeout=10)
    assert locker.returncode == 0
    after = server.trigger("hello")
    assert after == str(int(before) + 1), "the refused trigger left no job behind"
    assert server.final_status(after) == "Succeeded"
    assert logs(server, after) == "INFO: hi\n"
    assert "Traceback" not in server.stderr()
    assert server.stop() == 0


#
# Job control (issue 4) with real processes: cancel, wait, follow, reload.
#

CONTROL_TEMPLATES = """
[gate]
[gate.variables]
Dir = ""
[[gate.steps]]
run = 'echo started; while [ ! -e "$Dir/go" ]; do sleep 0.02; done; echo released'

[marker]
[marker.variables]
Dir = ""
[[marker.steps]]
run = 'touch "$Dir/marker-ran"; echo ran'

[forever]
[forever.variables]
Dir = ""
[[forever.steps]]
run = 'trap "echo got TERM; exit 143" TERM; sleep 300 & echo $! > "$Dir/forever.grandchild"; echo $$ > "$Dir/forever.child"; echo started; wait'

[stubborn]
[stubborn.variables]
Dir = ""
[[stubborn.steps]]
run = 'trap "" TERM; sleep 300 & echo $! > "$Dir/stubborn.grandchild"; echo started; wait; wait; wait'

[short]
[[short.steps]]
run = 'sleep 0.3; echo finished'

[pause]
[[pause.steps]]
run = 'sleep 1.5'

[ticker]
[[ticker.steps]]
run = 'for i in $(seq 1 30); do echo "tick $i"; sleep 0.01; done'
[[ticker.steps]]
log = "multi\\nline"
level = "WARN"
"""


def cancel(server, token):
    status, body, _ = server.get("/api/jobs/cancel", token=token)
    assert status == 200, body
    return body


def test_cancel_pending_job_never_starts(start_server, tmp_path):
    server = start_server(CONTROL_TEMPLATES, "--workers", "1", *GRACE)
    gate = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, gate, "started")
    pending = server.trigger("marker", Dir=str(tmp_path))
    after = server.trigger("short")
    assert cancel(server, pending) == "Error"
    assert logs(server, pending) == "ERROR: Job canceled\n"
    (tmp_path / "go").touch()
    assert server.final_status(gate) == "Succeeded"
    assert server.final_status(after) == "Succeeded"  # triggered later, so the canceled job had its turn
    assert not (tmp_path / "marker-ran").exists()
    assert status_word(server, pending) == "Error"
    assert logs(server, pending) == "ERROR: Job canceled\n"
    assert server.stop() == 0


def test_cancel_executing_job_kills_its_process_group(start_server, tmp_path, leftovers):
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("forever", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    child, grandchild = read_pid(tmp_path / "forever.child"), read_pid(tmp_path / "forever.grandchild")
    leftovers += [child, grandchild]
    started = time.monotonic()
    assert cancel(server, token) == "Error"
    assert time.monotonic() - started < 3, "SIGTERM ends a job that exits on it at once"
    lines = logs(server, token).splitlines()
    assert lines[0] == "INFO: started" and len(lines) == 3, lines
    assert sorted(lines[1:]) == ["ERROR: Job canceled", "INFO: got TERM"], "SIGTERM first, and the job saw it"
    assert_gone(child, grandchild)
    assert server.stop() == 0


def test_cancel_job_that_traps_term_is_killed_after_a_few_seconds(start_server, tmp_path, leftovers):
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("stubborn", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    grandchild = read_pid(tmp_path / "stubborn.grandchild")
    leftovers.append(grandchild)
    started = time.monotonic()
    assert cancel(server, token) == "Error"
    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 12, f"SIGKILL came {elapsed:.1f} s after SIGTERM"
    assert logs(server, token) == "INFO: started\nERROR: Job canceled\n"
    assert_gone(grandchild)
    assert server.stop() == 0


def test_cancel_finished_job_leaves_it(start_server):
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("short")
    assert server.final_status(token) == "Succeeded"
    assert cancel(server, token) == "Succeeded"
    assert status_word(server, token) == "Succeeded"
    assert logs(server, token) == "INFO: finished\n"
    assert server.stop() == 0


def test_status_wait_returns_when_the_job_ends(start_server, tmp_path):
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    release = threading.Timer(0.3, (tmp_path / "go").touch)
    started = time.monotonic()
    release.start()
    try:
        assert status_word(server, token, wait=20) == "Succeeded"
    finally:
        release.join()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.9, f"status&wait answered after {elapsed:.2f} s for a job that ended at 0.3 s"


def test_status_wait_returns_executing_after_the_wait(start_server, tmp_path):
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    started = time.monotonic()
    assert status_word(server, token, wait=0.7) == "Executing"
    elapsed = time.monotonic() - started
    assert 0.65 <= elapsed < 3, elapsed
    (tmp_path / "go").touch()
    assert server.final_status(token) == "Succeeded"
    assert server.stop() == 0


def test_logs_tail_loop_sees_every_entry_once(start_server):
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("ticker")
    seen, offset = [], 0
    for _ in range(200):
        status, body, headers = server.get("/api/jobs/logs", token=token, offset=offset, wait=10)
        assert status == 200, body
        seen += body.splitlines()
        assert int(headers["X-Log-Offset"]) == offset + body.count("\n")
        offset = int(headers["X-Log-Offset"])
        if headers["X-Job-Complete"] == "true":
            break
    else:
        raise AssertionError("the job never completed")
    expected = [f"INFO: tick {i}" for i in range(1, 31)] + ["WARN: multi", "WARN: line"]
    assert seen == expected
    assert logs(server, token) == "".join(line + "\n" for line in expected)
    status, body, headers = server.get("/api/jobs/logs", token=token, offset=offset, wait=5)
    assert (status, body, headers["X-Log-Offset"], headers["X-Job-Complete"]) == (200, "", str(offset), "true")
    assert server.stop() == 0


def test_logs_response_keeps_the_connection_alive(start_server):
    """A small log is answered with a Content-Length, so an HTTP/1.1 client keeps its connection."""
    server = start_server(CONTROL_TEMPLATES, *GRACE)
    token = server.trigger("short")
    assert server.final_status(token) == "Succeeded"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for query in (f"token={token}", f"token={token}&offset=0", f"token={token}&offset=1&wait=1"):
            connection.request("GET", f"/api/jobs/logs?{query}")
            response = connection.getresponse()
            body = response.read().decode()
            assert response.status == 200, body
            assert response.getheader("Connection", "").lower() != "close", (query, response.getheaders())
            assert connection.sock is not None, query
        connection.request("GET", f"/api/jobs/status?token={token}")
        assert connection.getresponse().read() == b"Succeeded"
    finally:
        connection.close()
    assert server.stop() == 0


RELOAD_V1 = CONTROL_TEMPLATES + """
[greet]
[[greet.steps]]
log = "version 1"
"""


def reload_lines(server, word):
    return [line for line in server.stderr().splitlines() if "templates" in line and word in line]


def test_sighup_and_file_change_reload(start_server, tmp_path):
    server = start_server(RELOAD_V1, "--workers", "1", *GRACE)
    path = server.templates
    gate = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, gate, "started")
    queued = server.trigger("greet")  # Pending with version 1

    # SIGHUP: the same size and mtime, so only the signal can make the server see the change.
    stamp = path.stat()
    path.write_text(textwrap.dedent(RELOAD_V1).replace("version 1", "version 2"))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size
    server.signal(signal.SIGHUP)
    wait_for(lambda: reload_lines(server, "reloaded"), 10, what="the SIGHUP reload")
    fresh = server.trigger("greet")
    (tmp_path / "go").touch()
    assert server.final_status(queued) == "Succeeded"
    assert logs(server, queued) == "INFO: version 1\n", "a job keeps the template it was triggered with"
    assert server.final_status(fresh) == "Succeeded"
    assert logs(server, fresh) == "INFO: version 2\n"

    # A change to the file is picked up without a signal.
    path.write_text(textwrap.dedent(RELOAD_V1).replace("version 1", "version three") +
                    '\n[added]\n[[added.steps]]\nlog = "new template"\n')
    wait_for(lambda: server.get("/api/jobs/trigger", template="added")[0] == 200, 10, interval=0.1,
             what="the file-change reload")
    token = server.trigger("greet")
    assert server.final_status(token) == "Succeeded"
    assert logs(server, token) == "INFO: version three\n"

    # A bad file is refused with one line on stderr; the templates in force stay.
    assert not reload_lines(server, "not reloaded")
    path.write_text("[greet\nlog = 'broken'\n")
    wait_for(lambda: reload_lines(server, "not reloaded"), 10, what="the refusal of a bad file")
    token = server.trigger("greet")
    assert server.final_status(token) == "Succeeded"
    assert logs(server, token) == "INFO: version three\n"
    pause = server.trigger("pause")  # the file watcher looks at the unchanged bad file once more meanwhile
    assert server.final_status(pause) == "Succeeded"
    refusals = reload_lines(server, "not reloaded")
    assert len(refusals) == 1, refusals
    assert str(path) in refusals[0] and "line 1" in refusals[0], refusals
    assert "Traceback" not in server.stderr()
    assert server.stop() == 0


#
# Regression tests for the fixes of an independent review.
#

REVIEW_TEMPLATES = """
[block]
max_concurrent = 1
[[block.steps]]
run = 'echo started; sleep 30'

[escaped]
[escaped.variables]
Dir = ""
[[escaped.steps]]
run = '''setsid sh -c 'echo $$ > "$Dir/escaped"; exec sleep 30' & echo started'''

[secretive]
[secretive.variables]
Dir = ""
Pw = { default = "", secret = true }
[[secretive.steps]]
run = 'echo $$ > "$Dir/child"; echo started; sleep 30'

[hello]
[[hello.steps]]
log = "hi"
"""


def stored_variables(db, token):
    """A job's variables as the database keeps them: a secret's value while the job runs, None after."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        variables, secrets = connection.execute("SELECT variables, secrets FROM jobs WHERE id = ?",
                                                (int(token),)).fetchone()
    return {**json.loads(variables), **json.loads(secrets or "{}")}


def test_review_second_instance_leaves_the_first_ones_jobs_alone(start_server, tmp_path):
    server = start_server(REVIEW_TEMPLATES, *GRACE)
    executing = server.trigger("block")
    wait_for_log(server, executing, "started")
    pending = server.trigger("block")
    assert status_word(server, executing) == "Executing"
    assert status_word(server, pending) == "Pending"

    # The same port and the same database: the port is taken.
    result = run_app("--port", str(server.port), "--templates", str(server.templates), "--db", str(server.db),
                     timeout=15)
    assert_one_clear_line(result, str(server.port))
    assert status_word(server, executing) == "Executing"
    assert status_word(server, pending) == "Pending"
    assert logs(server, executing) == "INFO: started\n"
    assert logs(server, pending) == ""

    # Another port, the same database: the database is in use.
    result = run_app("--port", "0", "--templates", str(server.templates), "--db", str(server.db), timeout=15)
    line = assert_one_clear_line(result, str(server.db))
    assert re.search(r"in use|another app\.py", line), line
    assert status_word(server, executing) == "Executing"
    assert status_word(server, pending) == "Pending"
    assert logs(server, executing) == "INFO: started\n"
    assert logs(server, pending) == ""

    # The same database through a symbolic link: still the same database.
    link = tmp_path / "link.db"
    link.symlink_to(server.db)
    result = run_app("--port", "0", "--templates", str(server.templates), "--db", str(link), timeout=15)
    line = assert_one_clear_line(result, str(link))
    assert re.search(r"in use|another app\.py", line), line
    assert status_word(server, executing) == "Executing"
    assert status_word(server, pending) == "Pending"

    assert cancel(server, pending) == "Error"
    assert cancel(server, executing) == "Error"
    assert server.stop() == 0


def test_review_step_with_escaped_descendants_finishes(start_server, tmp_path, leftovers):
    server = start_server(REVIEW_TEMPLATES, *GRACE)
    started = time.monotonic()
    token = server.trigger("escaped", Dir=str(tmp_path))
    escaped = read_pid(tmp_path / "escaped")
    leftovers.append(escaped)
    assert server.final_status(token, timeout=10) == "Warning"
    assert time.monotonic() - started < 8, "the step is given up after a short grace"
    lines = logs(server, token).splitlines()
    assert lines[0] == "INFO: started", lines
    assert all(line.startswith("WARN: ") for line in lines[1:]), lines
    assert any("left the step's process group" in line and "output" in line for line in lines[1:]), lines
    assert server.stop() == 0


def test_review_secret_removed_when_restart_ends_an_executing_job(start_server, tmp_path, leftovers):
    server = start_server(REVIEW_TEMPLATES, *GRACE)
    token = server.trigger("secretive", Dir=str(tmp_path), Pw="restart-secret-R7")
    wait_for_log(server, token, "started")
    child = read_pid(tmp_path / "child")
    leftovers.append(child)
    assert stored_variables(server.db, token)["Pw"] == "restart-secret-R7", "kept while the job runs"
    server.kill()

    again = start_server(REVIEW_TEMPLATES, *GRACE, db=server.db)
    assert again.final_status(token, timeout=10) == "Error"
    assert stored_variables(again.db, token) == {"Dir": str(tmp_path), "Pw": None}
    assert "restart-secret-R7" not in logs(again, token)
    assert_gone(child)
    assert again.stop() == 0


def test_review_token_never_reused_after_pruning(start_server):
    server = start_server(REVIEW_TEMPLATES, "--keep-days", "0.00002", *GRACE)  # about 1.7 s
    token = server.trigger("hello")
    assert server.final_status(token) == "Succeeded"

    def pruned():
        status, body, _ = server.get("/api/jobs/status", token=token)
        return status == 400 and "No job" in body

    wait_for(pruned, 15, interval=0.1, what="the job to be pruned")
    assert server.stop() == 0

    again = start_server(REVIEW_TEMPLATES, *GRACE, db=server.db)
    fresh = again.trigger("hello")
    assert int(fresh) > int(token), (fresh, token)
    assert again.final_status(fresh) == "Succeeded"
    assert again.stop() == 0



#
# Regression tests for the fixes of a second independent review, with a real server.
#


def second_review_templates(log_steps: int) -> str:
    """A job of `log_steps` log steps of 5,000 lines each (no process at all), and two small ones."""
    lines = "\n".join(f"line {n}" for n in range(5000))
    steps = "".join(f"[[biglog.steps]]\nlog = \"\"\"{lines}\"\"\"\n" for _ in range(log_steps))
    return (f"[biglog]\n{steps}\n"
            '[hello]\nallow_new_variables = true\n[[hello.steps]]\nlog = "hi"\n\n'
            '[keyed]\nkey = "clé-secrète"\n[[keyed.steps]]\nlog = "keyed"\n')


def test_review2_a_log_job_killed_half_way_ends_at_restart(start_server):
    """A job of log steps only that stored entries was still Pending: after kill -9 it ran again from its
    first entry, collided with the stored ones and stayed Pending for ever, holding a worker."""
    templates = second_review_templates(200)
    server = start_server(templates, "--workers", "1", *GRACE)
    token = server.trigger("biglog")
    wait_for(lambda: len(logs(server, token)) > 0, 20, what="the first entries to be stored")
    assert status_word(server, token) == "Executing"
    server.kill()

    again = start_server(templates, "--workers", "1", *GRACE, db=server.db)
    assert again.final_status(token, timeout=20) == "Error"
    assert "server stopped" in logs(again, token).splitlines()[-1]
    later = again.trigger("hello")
    assert again.final_status(later, timeout=20) == "Succeeded"
    assert again.stop() == 0


def test_review2_a_chunked_body_of_max_body_bytes_is_accepted(start_server):
    """waitress counts the chunks' framing toward its limit: it must not refuse what --max-body allows."""
    server = start_server(second_review_templates(0), "--max-body", "1000", *GRACE)

    def post_chunked(body: bytes, chunk: int) -> tuple[int, str]:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk])
                          for i in range(0, len(body), chunk)) + b"0\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
            connection.sendall(b"POST /api/jobs/trigger HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                               b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + framed)
            response = b""
            while chunk_read := connection.recv(65536):
                response += chunk_read
        head, _, text = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), text.decode()

    fits = b"template=hello&Pad=" + b"x" * (1000 - len(b"template=hello&Pad="))
    status, token = post_chunked(fits, 10)
    assert status == 200, token
    assert server.final_status(token) == "Succeeded"
    status, text = post_chunked(fits + b"x", 10)
    assert status == 413 and "larger than 1000 bytes" in text, (status, text)
    assert server.stop() == 0


def test_review2_a_non_ascii_key_works_in_the_header(start_server):
    server = start_server(second_review_templates(0), *GRACE)
    path = "/api/jobs/trigger?template=keyed"
    for encoding in ("utf-8", "latin-1"):  # what clients send; HTTP once defined header text as Latin-1
        status, token, _ = server.request("GET", path, headers={"X-ApiKey": "clé-secrète".encode(encoding)})
        assert status == 200, (encoding, token)
        assert server.final_status(token, key="clé-secrète") == "Succeeded"
    for wrong in ("cle-secrete".encode(), "clé-secrèt".encode(), b"\xff\xfe"):
        status, body, _ = server.request("GET", path, headers={"X-ApiKey": wrong})
        assert (status, body) == (403, "Invalid API key"), (wrong, status, body)
    assert server.stop() == 0

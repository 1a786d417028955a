"""A real `python app.py` on loopback, for what crosses a process boundary: restart recovery after kill -9, a
second instance started on the same port or database, timeouts and leftover processes killed by process
group, cancel by SIGTERM then SIGKILL, status&wait and following a log over HTTP, what only waitress shows
(--max-body with chunked bodies, a key header's encodings, --max-pending's Retry-After), and template reloads
on SIGHUP and on a change of the file.

start_server gives every server a short --grace (see SERVER_DEFAULTS in conftest.py)."""

import os
import re
import signal
import socket
import textwrap
import threading
import time

import pytest

from conftest import (FAMILY, GATE, HELLO, KeepAliveClient, alive, assert_gone, assert_one_clear_line, dir_template,
                      logs, read_pid, status_word, stored_variables, wait_for, wait_for_log)


#
# Restart recovery: a killed server cannot clean up; the next start does.
#

RECOVERY_TEMPLATES = HELLO + dir_template("block", FAMILY.format(then="wait"), Pw='{ default = "", secret = true }')


def test_restart_ends_executing_in_error_drops_its_secrets_and_runs_pending(start_server, tmp_path, leftovers):
    server = start_server(RECOVERY_TEMPLATES, "--workers", "1")
    executing = server.trigger("block", Dir=str(tmp_path), Pw="restart-secret-R7")
    wait_for_log(server, executing, "started")
    pending = server.trigger("hello")
    assert status_word(server, executing) == "Executing"
    assert status_word(server, pending) == "Pending"
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    leftovers += [child, grandchild]
    assert stored_variables(server, executing)["Pw"] == "restart-secret-R7", "kept while the job runs"

    server.kill()
    assert alive(child) and alive(grandchild), "a killed server cannot clean up: the restart has to"

    again = start_server(RECOVERY_TEMPLATES, "--workers", "1", db=server.db)
    assert again.final_status(executing, timeout=10) == "Error"
    lines = logs(again, executing).splitlines()
    assert lines[0] == "INFO: started"
    assert len(lines) == 2 and re.match(r"ERROR: .*server (stopped|restarted).* while", lines[1], re.I), lines
    assert "restart-secret-R7" not in lines[1]
    assert stored_variables(again, executing) == {"Dir": str(tmp_path), "Pw": None}
    assert_gone(child, grandchild)

    assert again.final_status(pending, timeout=10) == "Succeeded"
    assert logs(again, pending) == "INFO: hi\n"
    assert again.stop() == 0


def test_a_log_job_killed_half_way_ends_at_restart(start_server):
    """A job of log steps only (no process at all) that stored entries was still Pending: after kill -9 it ran
    again from its first entry, collided with the stored ones and stayed Pending for ever, holding a worker."""
    lines = "\n".join(f"line {n}" for n in range(5000))
    templates = HELLO + "[biglog]\n" + "".join(f'[[biglog.steps]]\nlog = """{lines}"""\n' for _ in range(40))
    server = start_server(templates, "--workers", "1")
    token = server.trigger("biglog")
    wait_for_log(server, token, "line 0", timeout=20)
    assert status_word(server, token) == "Executing"
    server.kill()

    again = start_server(templates, "--workers", "1", db=server.db)
    assert again.final_status(token, timeout=20) == "Error"
    assert "server stopped" in logs(again, token).splitlines()[-1]
    later = again.trigger("hello")
    assert again.final_status(later, timeout=20) == "Succeeded"
    assert again.stop() == 0


#
# A second instance on the same port or database leaves the first one's jobs alone (app.main in this process
# against the real server).
#


def test_a_second_instance_leaves_the_first_ones_jobs_alone(start_server, run_main, tmp_path):
    server = start_server("[block]\nmax_concurrent = 1\n[[block.steps]]\nrun = 'echo started; sleep 30'\n")
    executing = server.trigger("block")
    wait_for_log(server, executing, "started")
    pending = server.trigger("block")

    def unchanged():
        assert status_word(server, executing) == "Executing"
        assert status_word(server, pending) == "Pending"
        assert logs(server, executing) == "INFO: started\n"
        assert logs(server, pending) == ""

    unchanged()
    link = tmp_path / "link.db"
    link.symlink_to(server.db)
    for port, db, named in [(server.port, server.db, str(server.port)),  # the port is taken
                            (0, server.db, str(server.db)),  # another port: the database is in use
                            (0, link, str(link))]:  # through a symbolic link: still the same database
        line = assert_one_clear_line(*run_main("--port", str(port), "--templates", str(server.templates),
                                               "--db", str(db)), named)
        assert port or re.search(r"in use|another app\.py", line), line
        unchanged()

    assert cancel(server, pending) == "Error"
    assert cancel(server, executing) == "Error"
    assert server.stop() == 0


#
# Timeouts kill the whole process group.
#

TIMEOUT_TEMPLATES = dir_template("step_timeout", FAMILY.format(then="sleep 300"),
                                 'timeout = 0.5\n[[step_timeout.steps]]\nlog = "never logged"\n') + f"""
[job_timeout]
timeout = 0.5
[job_timeout.variables]
Dir = ""
[[job_timeout.steps]]
log = "first step"
[[job_timeout.steps]]
run = '''{FAMILY.format(then="sleep 300")}'''
timeout = 60
[[job_timeout.steps]]
log = "never logged"
"""


@pytest.mark.parametrize("template, first_lines, reason", [
    ("step_timeout", ["INFO: started"], r"ERROR: Step timed out"),
    ("job_timeout", ["INFO: first step", "INFO: started"], r"ERROR: Job timed out"),
])
def test_timeout_kills_child_and_grandchild(start_server, tmp_path, leftovers, template, first_lines, reason):
    server = start_server(TIMEOUT_TEMPLATES)
    started = time.monotonic()
    token = server.trigger(template, Dir=str(tmp_path))
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    leftovers += [child, grandchild]
    assert server.final_status(token, timeout=20) == "Error"
    assert 0.5 <= time.monotonic() - started < 5, "a 0.5 s timeout"
    assert_gone(child, grandchild)
    lines = logs(server, token).splitlines()
    assert lines[:-1] == first_lines, lines
    assert re.match(reason, lines[-1]), lines
    assert server.stop() == 0


#
# What a step leaves running when its main process exits is killed.
#

ORPHAN_TEMPLATES = (
    dir_template("detached", 'sleep 300 >/dev/null 2>&1 & echo $! > "$Dir/background"; echo done')
    + dir_template("holds_output", 'sleep 300 & echo $! > "$Dir/background"; echo done',
                   '[[holds_output.steps]]\nlog = "next step"\n')
    + dir_template("escaped", """setsid sh -c 'echo $$ > "$Dir/background"; exec sleep 30' & echo done"""))


def test_background_child_killed_when_step_exits(start_server, tmp_path, leftovers):
    server = start_server(ORPHAN_TEMPLATES)
    token = server.trigger("detached", Dir=str(tmp_path))
    background = read_pid(tmp_path / "background")
    leftovers.append(background)
    assert server.final_status(token) == "Succeeded"
    assert logs(server, token) == "INFO: done\n"
    assert_gone(background)
    assert server.stop() == 0


def test_background_child_holding_output_is_killed_with_a_warning(start_server, tmp_path, leftovers):
    server = start_server(ORPHAN_TEMPLATES)
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


def test_a_step_whose_descendants_left_its_group_still_finishes(start_server, tmp_path, leftovers):
    server = start_server(ORPHAN_TEMPLATES)
    started = time.monotonic()
    token = server.trigger("escaped", Dir=str(tmp_path))
    leftovers.append(read_pid(tmp_path / "background"))
    assert server.final_status(token, timeout=10) == "Warning"
    assert time.monotonic() - started < 8, "the step is given up after a short grace"
    lines = logs(server, token).splitlines()
    assert lines[0] == "INFO: done", lines
    assert all(line.startswith("WARN: ") for line in lines[1:]), lines
    assert any("left the step's process group" in line and "output" in line for line in lines[1:]), lines
    assert server.stop() == 0


#
# What only a real HTTP server shows: bodies framed by waitress, a key header's bytes, Retry-After.
#


def post_chunked(server, body: bytes, chunk: int) -> tuple[int, str]:
    """A trigger whose form body is sent in chunks (Transfer-Encoding: chunked); (status, text)."""
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


def test_max_body_plain_and_chunked(start_server):
    """A body of exactly --max-body bytes is accepted, one byte more is 413; waitress counts a chunked body's
    framing toward its own limit, which must not refuse what --max-body allows."""
    server = start_server(HELLO, "--max-body", "1000")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    fits = "template=hello&Pad=" + "x" * (1000 - len("template=hello&Pad="))
    status, token, _ = server.request("POST", "/api/jobs/trigger", body=fits, headers=form)
    assert status == 200, f"a body of exactly --max-body bytes is allowed: {token}"
    assert server.final_status(token) == "Succeeded"
    for size in (1001, 5000):
        status, body, _ = server.request("POST", "/api/jobs/trigger", body=fits + "x" * (size - 1000), headers=form)
        assert (status, body) == (413, "The request body is larger than 1000 bytes")
    status, token = post_chunked(server, fits.encode(), 10)
    assert status == 200, token
    assert server.final_status(token) == "Succeeded"
    status, text = post_chunked(server, fits.encode() + b"x", 10)
    assert (status, text) == (413, "The request body is larger than 1000 bytes")
    assert server.stop() == 0


def test_a_non_ascii_key_works_in_the_header(start_server):
    server = start_server('[keyed]\nkey = "clé-secrète"\n[[keyed.steps]]\nlog = "keyed"\n')
    path = "/api/jobs/trigger?template=keyed"
    for encoding in ("utf-8", "latin-1"):  # what clients send; HTTP once defined header text as Latin-1
        status, token, _ = server.request("GET", path, headers={"X-ApiKey": "clé-secrète".encode(encoding)})
        assert status == 200, (encoding, token)
        assert server.final_status(token, key="clé-secrète") == "Succeeded"
    for wrong in ("cle-secrete".encode(), "clé-secrèt".encode(), b"\xff\xfe"):
        status, body, _ = server.request("GET", path, headers={"X-ApiKey": wrong})
        assert (status, body) == (403, "Invalid API key"), (wrong, status, body)
    assert server.stop() == 0


def test_max_pending_answers_503_with_retry_after(start_server, tmp_path):
    server = start_server(HELLO + dir_template("gate", GATE), "--workers", "1", "--max-pending", "2")
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


#
# Cancel with real processes: SIGTERM to the step's process group, SIGKILL --cancel-grace seconds later.
#

CONTROL_TEMPLATES = HELLO + "".join([
    dir_template("gate", GATE + "; echo released"),
    dir_template("marker", 'touch "$Dir/marker-ran"; echo ran'),
    dir_template("forever", 'trap "echo got TERM; exit 143" TERM; ' + FAMILY.format(then="wait")),
    dir_template("stubborn", 'trap "" TERM; ' + FAMILY.format(then="wait; wait; wait")),
    '[ticker]\n[[ticker.steps]]\nrun = \'for i in $(seq 1 30); do echo "tick $i"; sleep 0.01; done\'\n'
    '[[ticker.steps]]\nlog = "multi\\nline"\nlevel = "WARN"\n',
])


def cancel(server, token):
    status, body, _ = server.get("/api/jobs/cancel", token=token)
    assert status == 200, body
    return body


def test_cancel_pending_job_never_starts(start_server, tmp_path):
    server = start_server(CONTROL_TEMPLATES, "--workers", "1")
    gate = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, gate, "started")
    pending = server.trigger("marker", Dir=str(tmp_path))
    after = server.trigger("hello")
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
    server = start_server(CONTROL_TEMPLATES)
    token = server.trigger("forever", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    leftovers += [child, grandchild]
    started = time.monotonic()
    assert cancel(server, token) == "Error"
    assert time.monotonic() - started < 3, "SIGTERM ends a job that exits on it at once"
    lines = logs(server, token).splitlines()
    assert lines[0] == "INFO: started" and len(lines) == 3, lines
    assert sorted(lines[1:]) == ["ERROR: Job canceled", "INFO: got TERM"], "SIGTERM first, and the job saw it"
    assert_gone(child, grandchild)
    assert server.stop() == 0


def test_cancel_job_that_traps_term_is_killed_after_the_cancel_grace(start_server, tmp_path, leftovers):
    server = start_server(CONTROL_TEMPLATES, "--cancel-grace", "0.5")
    token = server.trigger("stubborn", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    grandchild = read_pid(tmp_path / "grandchild")
    leftovers.append(grandchild)
    started = time.monotonic()
    assert cancel(server, token) == "Error"
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5, f"SIGKILL came {elapsed:.1f} s after SIGTERM, with --cancel-grace 0.5"
    assert logs(server, token) == "INFO: started\nERROR: Job canceled\n"
    assert_gone(grandchild)
    assert server.stop() == 0


def test_cancel_finished_job_leaves_it(start_server):
    server = start_server(CONTROL_TEMPLATES)
    token = server.trigger("hello")
    assert server.final_status(token) == "Succeeded"
    assert cancel(server, token) == "Succeeded"
    assert status_word(server, token) == "Succeeded"
    assert logs(server, token) == "INFO: hi\n"
    assert server.stop() == 0


#
# Waiting: status&wait, and following a log with offset&wait.
#


@pytest.mark.alone
def test_status_wait_runs_out_executing_and_answers_when_the_job_ends(start_server, tmp_path):
    server = start_server(CONTROL_TEMPLATES)
    token = server.trigger("gate", Dir=str(tmp_path))
    wait_for_log(server, token, "started")
    started = time.monotonic()
    assert status_word(server, token, wait=0.5) == "Executing"
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 3, elapsed

    release = threading.Timer(0.3, (tmp_path / "go").touch)
    started = time.monotonic()
    release.start()
    try:
        assert status_word(server, token, wait=20) == "Succeeded"
    finally:
        release.join()
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.9, f"status&wait answered after {elapsed:.2f} s for a job that ended at 0.3 s"
    assert server.stop() == 0


def test_following_a_log_over_one_connection_sees_every_entry_once(start_server):
    """A tail loop of offset&wait sees each entry once; a small log is answered with a Content-Length, so an
    HTTP/1.1 client keeps its one connection all along."""
    server = start_server(CONTROL_TEMPLATES)
    token = server.trigger("ticker")
    client = KeepAliveClient(server.port, timeout=30)
    try:
        seen, offset = [], 0
        for _ in range(200):
            status, body, headers = client.get("/api/jobs/logs", token=token, offset=offset, wait=10)
            assert status == 200, body
            assert headers.get("Connection", "").lower() != "close", headers
            seen += body.splitlines()
            assert int(headers["X-Log-Offset"]) == offset + body.count("\n")
            offset = int(headers["X-Log-Offset"])
            if headers["X-Job-Complete"] == "true":
                break
        else:
            raise AssertionError("the job never completed")
        expected = [f"INFO: tick {i}" for i in range(1, 31)] + ["WARN: multi", "WARN: line"]
        assert seen == expected
        assert client.get("/api/jobs/logs", token=token)[:2] == (200, "".join(line + "\n" for line in expected))
        status, body, headers = client.get("/api/jobs/logs", token=token, offset=offset, wait=5)
        assert (status, body, headers["X-Log-Offset"], headers["X-Job-Complete"]) == (200, "", str(offset), "true")
        assert client.get("/api/jobs/status", token=token)[:2] == (200, "Warning")
        assert client.connects == 1 and client.connection.sock is not None, "the connection was kept alive"
    finally:
        client.close()
    assert server.stop() == 0


#
# Template reloads: SIGHUP, and a change of the file.
#

RELOAD_V1 = (CONTROL_TEMPLATES + '[greet]\n[[greet.steps]]\nlog = "version 1"\n'
             "[pause]\n[[pause.steps]]\nrun = 'sleep 1.5'\n")


def reload_lines(server, word):
    return [line for line in server.stderr().splitlines() if "templates" in line and word in line]


def test_sighup_and_file_change_reload(start_server, tmp_path):
    server = start_server(RELOAD_V1, "--workers", "1")
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
    pause = server.trigger("pause")  # the file watcher (every second) looks at the unchanged bad file again
    assert server.final_status(pause) == "Succeeded"
    refusals = reload_lines(server, "not reloaded")
    assert len(refusals) == 1, refusals
    assert str(path) in refusals[0] and "line 1" in refusals[0], refusals
    assert "Traceback" not in server.stderr()
    assert server.stop() == 0

"""What a job does once triggered, in process on both stores: its steps and the status word they end in, the log
format and levels, the step environment (a request's values arrive as data, never as code), a process's output
cut into entries and masked, secrets (masked in the log, kept apart while the job is not final, dropped after),
the log budget, max_concurrent and the queue, and the template version a job keeps.

What needs a real server (timeouts, leftover processes, cancel with signals, restarts) is in test_server.py."""

import json
import os
import re
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import app as server_module
from conftest import (FINAL, alive, assert_gone, call, fifo_has_reader, final_status, logs_of, make_fifo, module_app,
                      query, release, run_job, status_of, stop_app, store_database, stored_variables, trigger,
                      wait_for)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Every test of this file that runs jobs runs them on both stores."""
    return store_database(request.param, request, tmp_path)


#
# Status words and the log format.
#

RUNNER = '''
[succeeds]
[[succeeds.steps]]
log = "just info"
[[succeeds.steps]]
log = "some debug"
level = "DEBUG"
[[succeeds.steps]]
run = "echo out"

[warns]
[[warns.steps]]
run = "echo working"
[[warns.steps]]
run = "echo 'disk almost full' >&2"

[warns-by-log]
[[warns-by-log.steps]]
log = "first\\nsecond\\n\\nfourth"
level = "WARN"

[fails]
[[fails.steps]]
run = "echo before; exit 7"
[[fails.steps]]
log = "never logged"
[[fails.steps]]
run = "echo never run"

[exec-fails]
[[exec-fails.steps]]
exec = ["false"]
[[exec-fails.steps]]
log = "never logged"

[continues]
[[continues.steps]]
run = "echo trying; exit 2"
continue_on_error = true
[[continues.steps]]
log = "after the failure"
[[continues.steps]]
run = "echo still running"

[levels]
[[levels.steps]]
run = "printf 'one\\ntwo\\n'"
stdout_level = "DEBUG"
[[levels.steps]]
run = "echo complaint >&2"
stderr_level = "ERROR"
[[levels.steps]]
run = "echo quiet >&2"
stderr_level = "INFO"

[error-log]
[[error-log.steps]]
log = "explicit error"
level = "ERROR"
[[error-log.steps]]
log = "not reached?"

[multiline-output]
[[multiline-output.steps]]
run = "printf 'a\\nb\\nc'"

[trailing]
[[trailing.steps]]
log = """
first
second
"""
[[trailing.steps]]
log = "single\\n"
[[trailing.steps]]
log = ""

[missing-program]
[[missing-program.steps]]
exec = ["/nonexistent/program"]
[[missing-program.steps]]
log = "never logged"
'''


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def runner(request, tmp_path_factory):
    """One app per store for the table of jobs below: each test reads only its own job."""
    with module_app(request, tmp_path_factory, RUNNER, request.param) as client:
        yield client


@pytest.mark.parametrize("template, expected_status, expected_logs", [
    ("succeeds", "Succeeded", "INFO: just info\nDEBUG: some debug\nINFO: out\n"),
    ("warns", "Warning", "INFO: working\nWARN: disk almost full\n"),
    ("warns-by-log", "Warning", "WARN: first\nWARN: second\nWARN: \nWARN: fourth\n"),
    ("fails", "Error", "INFO: before\nERROR: Process exited with code: 7\n"),
    ("exec-fails", "Error", "ERROR: Process exited with code: 1\n"),
    ("continues", "Error",
     "INFO: trying\nERROR: Process exited with code: 2\nINFO: after the failure\nINFO: still running\n"),
    ("levels", "Error", "DEBUG: one\nDEBUG: two\nERROR: complaint\nINFO: quiet\n"),
    ("multiline-output", "Succeeded", "INFO: a\nINFO: b\nINFO: c\n"),
    # A log step ending in a newline adds no empty entry; an empty one is one empty entry.
    ("trailing", "Succeeded", "INFO: first\nINFO: second\nINFO: single\nINFO: \n"),
])
def test_status_words_and_log_format(runner, template, expected_status, expected_logs):
    _, status, logs = run_job(runner, template)
    assert status == expected_status
    assert logs == expected_logs


def test_an_error_log_step_makes_the_job_error(runner):
    _, status, logs = run_job(runner, "error-log")
    assert status == "Error"
    assert logs.startswith("ERROR: explicit error\n")


def test_a_program_that_cannot_start_is_an_error(runner):
    _, status, logs = run_job(runner, "missing-program")
    assert status == "Error"
    assert logs.startswith("ERROR: ") and "never logged" not in logs


def test_every_log_line_has_the_format(runner):
    for template in ("succeeds", "warns", "fails", "continues", "levels"):
        _, _, logs = run_job(runner, template)
        assert logs.endswith("\n")
        for line in logs.split("\n")[:-1]:
            assert re.fullmatch(r"(DEBUG|INFO|WARN|ERROR): .*", line), line


#
# The step environment: a minimal environment, and values that arrive as data.
#


def test_the_step_environment_is_minimal(make_app, monkeypatch):
    monkeypatch.setenv("API_TEST_SERVER_ONLY", "must-not-leak")
    client = make_app('''
        [envcheck]
        [envcheck.variables]
        Target = "t1"
        [[envcheck.steps]]
        exec = ["env"]
        env = { STEP_EXTRA = "from-step", NUMBER = 5, JobToken = "0", JobInstance = "another" }
        [[envcheck.steps]]
        run = 'echo "leak=${API_TEST_SERVER_ONLY-unset} extra=${STEP_EXTRA-unset} target=$Target"'
    ''')
    token, status, logs = run_job(client, "envcheck", Target="t2")
    assert status == "Succeeded"
    lines = [line.removeprefix("INFO: ") for line in logs.splitlines()]
    assert lines[-1] == "leak=unset extra=unset target=t2"  # a step's env is its own
    environment = dict(line.split("=", 1) for line in lines[:-1])
    assert set(environment) == {"PATH", "HOME", "LANG", "Target", "JobToken", "TemplateName", "JobInstance",
                                "STEP_EXTRA", "NUMBER"}
    assert environment["PATH"] and environment["HOME"] and environment["LANG"]
    assert environment["Target"] == "t2"
    assert environment["JobToken"] == token and environment["TemplateName"] == "envcheck"
    assert environment["JobInstance"] == client.app.extensions["jobserver"].runner.instance, \
        "the built-ins come after the step's env: they name the job's processes (kill_processes_of)"
    assert environment["STEP_EXTRA"] == "from-step" and environment["NUMBER"] == "5"


def test_step_cwd(make_app, tmp_path):
    (tmp_path / "workdir").mkdir()
    client = make_app(f'''
        [cwd]
        [[cwd.steps]]
        run = "pwd"
        cwd = "{tmp_path / 'workdir'}"
    ''')
    _, status, logs = run_job(client, "cwd")
    assert status == "Succeeded"
    assert logs == f"INFO: {tmp_path / 'workdir'}\n"


def test_shell_metacharacters_are_never_executed(make_app, tmp_path):
    marker = tmp_path / "pwned"
    client = make_app('''
        [meta]
        [meta.variables]
        Evil = "harmless"
        [[meta.steps]]
        run = 'printf "run:%s\\n" "$Evil"'
        [[meta.steps]]
        run = 'echo run-unquoted:$Evil'
        [[meta.steps]]
        exec = ["printf", "exec:[%s]\\n", "$Evil"]
        [[meta.steps]]
        exec = ["printf", "%s\\n", "pre-${Evil}-post"]
        [[meta.steps]]
        log = "log:$Evil"
    ''')
    value = (f"$(touch {marker}) `touch {marker}`; touch {marker} && touch {marker} | touch {marker} "
             f"> {marker} ' \" \\ $JobToken ${{Evil}} $$ %s %d")
    for method in ("GET", "POST"):
        token = call(client, method, "/api/jobs/trigger", {"template": "meta", "Evil": value}).text
        assert final_status(client, token) == "Succeeded"
        lines = logs_of(client, token).splitlines()
        assert lines[0] == f"INFO: run:{value}"
        assert lines[1].startswith("INFO: run-unquoted:$(touch ")  # word-split and globbed, never executed
        assert lines[2] == f"INFO: exec:[{value}]"  # one argv element: the format was used once
        assert lines[3] == f"INFO: pre-{value}-post"
        assert lines[4] == f"INFO: log:{value}"
        assert len(lines) == 5
        assert not marker.exists()


#
# A process's output cut into entries of at most 64 KiB and masked, first as the runner does it, fed to
# OutputCutter and Masker directly in chunks of our choosing (secrets were once stored in part when a read or a
# cut fell inside them), then through real jobs.
#


def output_reader(secrets, max_line=64):
    """(cutter, masker) as the runner makes them for one stream of a job with these secrets."""
    masker = server_module.Masker(secrets)
    return server_module.OutputCutter(masker.raw, max_line), masker


def feed(reader, chunks) -> list[str]:
    """The entries stored for output arriving in these chunks, ended as at the end of the stream."""
    cutter, masker = reader
    entries = [entry for chunk in chunks for entry in cutter.feed(chunk)] + cutter.end()
    return [server_module.sanitize_line(masker.output(entry).decode("utf-8", "replace")) for entry in entries]


def test_a_secret_inside_a_longer_one_does_not_leave_the_rest_unmasked():
    """The unfinished line was kept masked: once its shorter secret was ***, the longer one, completed by the
    next read, no longer matched, and its rest was stored."""
    key, credential = "AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    reader = output_reader([key, credential], max_line=1000)
    assert feed(reader, [b"cred=" + key.encode(), credential[len(key):].encode() + b"\n"]) == ["cred=***"]


def test_a_secret_of_asterisks_is_masked_once():
    """Masking the kept line again at every read tripled each * of a secret "*" each time."""
    reader = output_reader(["*"], max_line=1000)
    assert feed(reader, [b"progress: "] + [b"*"] * 20 + [b" done\n"]) == ["progress: " + "***" * 20 + " done"]


@pytest.mark.parametrize("split", [None, 63, 64, 65, 66])
def test_a_cut_never_falls_inside_a_utf8_character(split):
    reader = output_reader([], max_line=64)
    text = ("€" * 60).encode()  # 180 bytes, 3 per character: the 64-byte cut is inside one
    chunks = [text + b"\n"] if split is None else [text[:split], text[split:] + b"\n"]
    entries = feed(reader, chunks)
    assert "".join(entries) == "€" * 60 and all(len(e.encode()) <= 64 for e in entries), entries


def test_a_short_secret_repeating_along_a_line_does_not_stop_the_cut_early():
    """A secret "aa" occurs at every place of a run of a's; the cut goes back to the run's start, once (one
    place at a time, for each of 8 KiB secrets, took 9 s of CPU per 64 KiB line)."""
    reader = output_reader(["aa", "x" * 8192, "y" * 8192], max_line=65536)
    entries = feed(reader, [b"c" * 57000 + b"a" * 8537 + b"\n"])
    assert [len(entry) for entry in entries] == [57000, 8537 // 2 * 3 + 1], [len(e) for e in entries]
    assert entries[0] == "c" * 57000 and "aa" not in entries[1]


@pytest.mark.parametrize("chunks", [[b"A" * 64 + b"\r\nend\r\n"], [b"A" * 64 + b"\r", b"\nend\r\n"]])
def test_the_cr_of_a_crlf_after_a_full_entry_adds_no_empty_entry(chunks):
    reader = output_reader([], max_line=64)
    assert feed(reader, chunks) == ["A" * 64, "end"]


@settings(max_examples=300, deadline=None)
@given(secret=st.text("abcé", min_size=1, max_size=8).filter(lambda s: len(set(s)) == len(s)),
       lines=st.lists(st.text("abcé*x", min_size=0, max_size=300) | st.text("abcé*x", min_size=60, max_size=300),
                      min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 800), max_size=12))
def test_output_is_masked_as_whole_lines_however_it_is_read_and_cut(secret, lines, cuts):
    """Whatever the reads and the 64-byte cuts, each line's entries together are the line masked whole.
    (A secret with no repeated character cannot overlap itself, so a cut outside it always exists.)"""
    reader = output_reader([secret], max_line=64)
    output = "\n".join(lines).encode() + b"\n"
    points = sorted({min(cut, len(output)) for cut in cuts} | {0, len(output)})
    entries = feed(reader, [output[a:b] for a, b in zip(points, points[1:]) if b > a])
    remaining = iter(entries)
    for line in [line.replace(secret, "***") for line in lines]:  # each line's entries, in order
        text = next(remaining)
        while text != line and text and line.startswith(text):  # the pieces of a line that was cut
            text += next(remaining)
        assert text == line, (entries, lines)
    assert next(remaining, None) is None, entries


LONG_LINES = '''
[straddle]
[straddle.variables]
Password = { default = "", secret = true, required = true }
Split = "no"
[[straddle.steps]]
# 65,530 bytes, then the secret across the 64 KiB cut: in one write, or its first 8 characters, a pause (the
# reader cuts the line meanwhile) and the rest.
run = """head -c 65530 /dev/zero | tr '\\\\0' a
if [ "$Split" = yes ]; then printf '%.8s' "$Password"; sleep 0.3; printf '%s' "${Password#????????}"
else printf '%s' "$Password"; fi
echo ' end'"""

[longline]
[[longline.steps]]
# One write: the reader most likely gets the end of the line, newline included, in its second read.
exec = ["python3", "-c", "import os; os.write(1, b'b' * 70000 + b'\\\\n')"]
'''


@pytest.mark.parametrize("split", ["no", "yes"])
def test_a_secret_across_the_64_KiB_cut_is_masked(make_app, split):
    client = make_app(LONG_LINES)
    secret = "TopSecretPassw0rd-XYZ"
    token, status, logs = run_job(client, "straddle", Password=secret, Split=split)
    assert status == "Succeeded", logs[-300:]
    for piece in (secret, secret[:6], secret[6:], "Passw0rd", "XYZ"):
        assert piece not in logs, piece
    entries = [line.removeprefix("INFO: ") for line in logs.splitlines()]
    assert "".join(entries) == "a" * 65530 + "*** end", [e[-20:] for e in entries]
    assert all(len(entry.encode()) <= 64 * 1024 for entry in entries)
    messages = query(client, "SELECT message FROM logs WHERE job_id = ?", int(token))
    assert not any("Passw0rd" in m or "TopSec" in m for (m,) in messages)


def test_a_finished_line_over_64_KiB_is_cut_too(make_app):
    """A line whose end arrives in the same read as its last 64 KiB was stored whole before."""
    client = make_app(LONG_LINES)
    token, status, logs = run_job(client, "longline")
    assert status == "Succeeded"
    sizes = [len(line.removeprefix("INFO: ")) for line in logs.splitlines()]
    assert sizes == [65536, 70000 - 65536], sizes


#
# Secrets: masked as *** wherever they would be logged, kept apart from the variables while the job is not
# final, and gone from the store once it is.
#

SECRETS = '''
[deploy]
[deploy.variables]
Login = "alice"
Password = { default = "", secret = true, required = true }
[[deploy.steps]]
log = "Logging in as $Login with $Password"
[[deploy.steps]]
run = 'echo "pw=$Password"; echo "twice $Password $Password"'
[[deploy.steps]]
run = 'echo "err pw=$Password" >&2'
stderr_level = "INFO"
[[deploy.steps]]
exec = ["printf", "argv:%s\\n", "--password=$Password"]

[multiline]
[multiline.variables]
Password = { default = "", secret = true, required = true }
[[multiline.steps]]
log = "log step: $Password"
[[multiline.steps]]
run = 'echo "pw=$Password"; echo "again: $Password."'

[cannot_start]
[cannot_start.variables]
Pw = { default = "", secret = true, required = true }
[[cannot_start.steps]]
exec = ["/nonexistent/$Pw"]

[with_default]
[with_default.variables]
Token2 = { default = "s3cr3t-default", secret = true }
[[with_default.steps]]
run = 'echo "using $Token2"; [ "${#Token2}" -eq 14 ]'

[limited_secret]
max_concurrent = 1
timeout = 30
[limited_secret.variables]
Fifo = { required = true }
Password = { default = "", secret = true }
[[limited_secret.steps]]
run = 'read line < "$Fifo"; echo "got $line"'

[chosen]
max_concurrent = 1
timeout = 30
[chosen.variables]
Pw = { default = "", choices = ["alpha-choice-value", "beta-choice-value"], secret = true }
Fifo = ""
[[chosen.steps]]
run = 'if [ -n "$Fifo" ]; then read line < "$Fifo"; fi; [ "${#Pw}" -eq 18 ]'
'''


def stored_text(client) -> str:
    """Everything the store keeps of templates and of the variables of jobs, secrets included."""
    return " ".join([row[0] for row in query(client, "SELECT definition FROM template_versions")] +
                    [row[0] for row in query(client, "SELECT variables || coalesce(secrets, '') FROM jobs")])


def test_secrets_are_masked_and_not_kept(make_app):
    client = make_app(SECRETS)
    secret = "hunter2-Xyz"
    token = trigger(client, "deploy", Password=secret)
    # The job and its variables are committed before the token is returned.
    assert query(client, "SELECT template FROM jobs WHERE id = ?", int(token)) == [("deploy",)]
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token) == (
        "INFO: Logging in as alice with ***\n"
        "INFO: pw=***\n"
        "INFO: twice *** ***\n"
        "INFO: err pw=***\n"
        "INFO: argv:--password=***\n"
    )
    variables, secrets = query(client, "SELECT variables, secrets FROM jobs WHERE id = ?", int(token))[0]
    assert json.loads(variables) == {"Login": "alice", "Password": None} and secrets is None
    messages = query(client, "SELECT message FROM logs WHERE job_id = ?", int(token))
    assert messages and not any(secret in message for (message,) in messages)
    assert secret not in stored_text(client)


def test_a_multiline_secret_is_masked_on_every_line(make_app):
    client = make_app(SECRETS)
    secret = "first-line-AAA\nsecond-line-BBB"
    token, status, logs = run_job(client, "multiline", Password=secret)
    assert status == "Succeeded", logs
    assert logs == (
        "INFO: log step: ***\n"
        "INFO: pw=***\n"
        "INFO: ***\n"
        "INFO: again: ***\n"
        "INFO: ***.\n"
    )
    for part in ("first-line", "AAA", "second-line", "BBB"):
        assert part not in logs
    messages = query(client, "SELECT message FROM logs WHERE job_id = ?", int(token))
    assert not any("AAA" in m or "BBB" in m for (m,) in messages)


def test_a_secret_in_a_program_that_cannot_start_is_masked(make_app):
    client = make_app(SECRETS)
    secret = "top\\secret-XYZ"  # a backslash: a repr() of the path would double it and escape the mask
    token, status, logs = run_job(client, "cannot_start", Pw=secret)
    assert status == "Error", logs
    lines = logs.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), lines
    assert "/nonexistent/***" in lines[0], lines
    assert "secret-XYZ" not in logs and "top\\" not in logs, logs


def test_a_secret_default_is_not_stored_but_still_used(make_app):
    client = make_app(SECRETS)
    token, status, logs = run_job(client, "with_default")
    assert (status, logs) == ("Succeeded", "INFO: using ***\n")
    assert "s3cr3t-default" not in stored_text(client)


def test_a_secret_is_removed_when_its_pending_job_is_canceled(make_app, tmp_path):
    client = make_app(SECRETS)
    first, second = make_fifo(tmp_path, "first"), make_fifo(tmp_path, "second")
    blocking = trigger(client, "limited_secret", Fifo=str(first), Password="first-secret-Q1")
    wait_for(lambda: status_of(client, blocking) == "Executing", what="the blocking job to start")
    pending = trigger(client, "limited_secret", Fifo=str(second), Password="pending-secret-Q2")
    assert status_of(client, pending) == "Pending"
    assert stored_variables(client, pending)["Password"] == "pending-secret-Q2", \
        "a Pending job keeps its secret until it ends"

    assert call(client, "GET", "/api/jobs/cancel", {"token": pending}).text == "Error"
    assert logs_of(client, pending) == "ERROR: Job canceled\n"
    variables, secrets = query(client, "SELECT variables, secrets FROM jobs WHERE id = ?", int(pending))[0]
    assert (json.loads(variables), secrets) == ({"Fifo": str(second), "Password": None}, None)
    assert not fifo_has_reader(second), "the canceled job never ran"

    release(first)
    assert final_status(client, blocking) == "Succeeded"
    assert "secret-Q" not in stored_text(client)


def test_a_secrets_choices_are_not_stored_and_its_stored_version_still_runs(make_app, tmp_path):
    """The stored version of a template leaves out a secret's choices; a job of that version still runs on an
    instance that never loaded it (the values were checked when the job was triggered)."""
    client = make_app(SECRETS)
    fifo = make_fifo(tmp_path, "gate")
    blocking = trigger(client, "chosen", Fifo=str(fifo), Pw="beta-choice-value")
    wait_for(lambda: status_of(client, blocking) == "Executing", what="the blocking job to start")
    pending = trigger(client, "chosen", Pw="alpha-choice-value")
    assert status_of(client, pending) == "Pending"
    definitions = " ".join(row[0] for row in query(client, "SELECT definition FROM template_versions"))
    assert "choice-value" not in definitions
    stop_app(client, grace=0)  # the blocking job is killed; the Pending one stays for the next instance

    again = make_app('[other]\n[[other.steps]]\nlog = "not the template of the pending job"\n')
    assert status_of(again, blocking) == "Error"
    assert final_status(again, pending) == "Succeeded"
    assert logs_of(again, pending) == ""
    assert "choice-value" not in stored_text(again)


#
# The log budget: max_log_bytes of output as it came, then one WARN entry.
#


def test_max_log_bytes_bounds_the_stored_log(make_app):
    client = make_app('''
        [chatty]
        max_log_bytes = 1000
        [[chatty.steps]]
        run = 'seq 1 100000'
        [[chatty.steps]]
        log = "after the flood"
    ''')
    token, status, logs = run_job(client, "chatty")
    assert status == "Warning"
    lines = logs.splitlines()

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


def test_the_log_budget_counts_output_as_it_came_not_masked(make_app):
    """Masking a 2-character secret as *** made 80 bytes of output count as 120 against a budget of 100."""
    client = make_app("""
        [t]
        max_log_bytes = 100
        [t.variables]
        Pw = { default = "", secret = true }
        [[t.steps]]
        run = 'for i in 1 2 3 4; do printf "%s%s%s%s%s%s%s%s%s%s\\n" $Pw $Pw $Pw $Pw $Pw $Pw $Pw $Pw $Pw $Pw; done'
    """)
    token, status, logs = run_job(client, "t", Pw="ab")
    assert (status, logs) == ("Succeeded", ("INFO: " + "***" * 10 + "\n") * 4), logs


#
# The queue: max_concurrent, the template version a job keeps, and when a job is marked Executing.
#

LIMITED = '''
[limited]
max_concurrent = 1
timeout = 30
[limited.variables]
Fifo = { required = true }
[[limited.steps]]
run = 'read line < "$Fifo"; echo "got $line"'

[quick]
[[quick.steps]]
log = "quick ran"

[biglog]
[[biglog.steps]]
log = """{lines}"""
'''.replace("{lines}", "\n".join(f"line {n}" for n in range(6000)))


def test_max_concurrent(make_app, tmp_path):
    client = make_app(LIMITED)
    first, second = make_fifo(tmp_path, "first"), make_fifo(tmp_path, "second")
    one = trigger(client, "limited", Fifo=str(first))
    two = trigger(client, "limited", Fifo=str(second))
    wait_for(lambda: status_of(client, one) == "Executing", what="the first limited job to start")
    # Another template's job runs meanwhile (there is a free worker), and finishes.
    quick = trigger(client, "quick")
    assert final_status(client, quick) == "Succeeded"
    assert status_of(client, one) == "Executing"
    assert status_of(client, two) == "Pending"
    assert not fifo_has_reader(second)

    release(first)
    assert final_status(client, one) == "Succeeded"
    assert logs_of(client, one) == "INFO: got go\n"
    release(second, b"second\n")
    assert final_status(client, two) == "Succeeded"
    assert logs_of(client, two) == "INFO: got second\n"


def test_a_job_triggered_for_an_idle_worker_is_handed_to_it_and_later_ones_queue(make_app, tmp_path):
    """With a worker idle and the queue empty, a trigger commits its job already claimed and hands it over
    (one statement fewer); while the only worker is busy, jobs wait Pending for a claim, in trigger order."""
    client = make_app(LIMITED.replace("max_concurrent = 1\n", ""), WORKERS=1)
    store = client.app.extensions["jobserver"].store
    handed = []
    insert_started_job = store.insert_started_job

    def spy(*args):
        handed.append(insert_started_job(*args))
        return handed[-1]

    store.insert_started_job = spy
    wait_for(lambda: client.app.extensions["jobserver"].runner.idle == 1, what="the worker to wait for work")
    first = make_fifo(tmp_path, "first")
    one = trigger(client, "limited", Fifo=str(first))
    assert handed == [(int(one), True)]
    wait_for(lambda: status_of(client, one) == "Executing", what="the handed job to run")
    two, three = trigger(client, "quick"), trigger(client, "quick")
    assert len(handed) == 1, "the worker is busy: no job is claimed for it"
    assert status_of(client, two) == status_of(client, three) == "Pending"
    release(first)
    assert [final_status(client, token) for token in (one, two, three)] == ["Succeeded"] * 3
    started = dict(query(client, "SELECT id, started_at FROM jobs"))
    assert started[int(one)] <= started[int(two)] <= started[int(three)]


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # the runner's own bookkeeping: either store
def test_a_worker_that_a_trigger_counts_on_leaves_hints_to_the_others(make_app):
    """While a trigger's statement is under way, the idle worker it will hand its job to must not go and claim
    another job on a hint (another trigger's event): the handed job would wait behind it, Executing."""
    client = make_app(LIMITED.replace("max_concurrent = 1\n", ""), WORKERS=1)
    site = client.app.extensions["jobserver"]
    runner, store = site.runner, site.store
    # idle, and past the hint the runner gives its workers at start (else it would claim on it meanwhile)
    wait_for(lambda: runner.idle == 1 and runner.hints == 0, what="the worker to wait for work")
    inside, go, claimed = server_module.threading.Event(), server_module.threading.Event(), \
        server_module.threading.Event()
    insert_started_job, claim_job = store.insert_started_job, store.claim_job

    def slow_insert(*args):
        inside.set()
        go.wait(10)
        return insert_started_job(*args)

    def spied_claim(instance):
        claimed.set()
        return claim_job(instance)

    store.insert_started_job, store.claim_job = slow_insert, spied_claim
    submitted = []
    submitting = server_module.threading.Thread(
        target=lambda: submitted.append(runner.submit(site.catalog.get("quick"), {})))
    submitting.start()
    assert inside.wait(5)
    runner.hint()  # as another trigger's event would
    assert not claimed.wait(0.5), "the worker counted on went to claim another job"
    go.set()
    submitting.join(10)
    assert final_status(client, str(submitted[0])) == "Succeeded"


def test_shutdown_gives_its_grace_to_a_job_claimed_just_before_and_not_yet_started(make_app, tmp_path):
    """The grace waits for the workers, not only for the jobs already running: a job claimed just before the
    shutdown (held here where a worker loads its template version) still gets the grace, then is killed."""
    client = make_app('[long]\n[[long.steps]]\nrun = "sleep 30"\n', WORKERS=1)
    site = client.app.extensions["jobserver"]
    runner, version = site.runner, site.catalog.version
    claimed, go = server_module.threading.Event(), server_module.threading.Event()

    def held_version(number):
        claimed.set()
        go.wait(10)
        return version(number)

    site.catalog.version = held_version
    token = trigger(client, "long")
    assert claimed.wait(10) and not runner.running, "claimed, not yet running"
    stopping = server_module.threading.Thread(target=server_module.shutdown_app, args=(client.app, 1.0))
    stopping.start()
    wait_for(lambda: runner.stopping.is_set(), what="the shutdown to begin")
    go.set()
    stopping.join(20)
    assert not stopping.is_alive()
    rows = query(client, "SELECT status FROM jobs WHERE id = ?", int(token))
    assert rows == [("Error",)], "the job ran in the grace and was killed at its end, not left running"


@pytest.mark.parametrize("doubt", ["ending", "disowned", "unstored", "old identity", "lapsing", "unrenewed",
                                   "ended elsewhere"])
def test_a_running_job_is_answered_from_memory_only_while_nothing_is_in_doubt(doubt):
    """JobRunner.running_job: what the store would say of a job this instance runs, or None (then the store is
    read) whenever the store may say otherwise."""
    template = SimpleNamespace(name="t", version=3, key_digest="digest")
    execution = SimpleNamespace(template=template, seq=2, ending=False, disowned=False, unstored=None, owner="i1")
    runner = SimpleNamespace(running={5: execution}, instance="i1", lease_lapsing=False,
                             watch=server_module.JobWatch(None), lease_renewed=time.monotonic(),
                             settings=SimpleNamespace(lease=20))
    running_job = server_module.JobRunner.running_job
    assert running_job(runner, 5) == server_module.JobRecord(5, "t", 3, "Executing", "digest", 2)
    assert running_job(runner, 6) is None
    runner.watch.update(5, server_module.Progress("Executing", 4))  # a write heard of before the worker's seq moved
    assert running_job(runner, 5).log_count == 4
    if doubt == "ended elsewhere":
        runner.watch.update(5, server_module.Progress("Error", 5))  # the watch's re-read found the store's end
    else:
        target, name, value = {
            "ending": (execution, "ending", True), "disowned": (execution, "disowned", True),
            "unstored": (execution, "unstored", "the store failed"), "old identity": (runner, "instance", "i2"),
            "lapsing": (runner, "lease_lapsing", True),
            "unrenewed": (runner, "lease_renewed", time.monotonic() - 11)}[doubt]
        setattr(target, name, value)
    assert running_job(runner, 5) is None


def test_a_dead_instances_processes_are_found_by_their_environment_and_killed(leftovers):
    """kill_processes_of: every process group in which a process of the given jobs of an instance runs,
    whatever became of the group's leader, and a group that one of its processes made of its own; never
    another job's, such as a daemon a finished job left, nor another instance's."""
    def started(instance, job, script):
        step = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True,
                                env={"PATH": server_module.BASE_PATH, "JobToken": job, "JobInstance": instance})
        with step.stdout:
            pid = int(step.stdout.readline())
        leftovers.extend([step.pid, pid])
        return step, pid

    step, child = started("dead", "7", "sleep 300 & echo $!; wait")
    led_by_none, orphan = started("dead", "8", "sleep 300 & echo $!")  # the leader exits, its child goes on
    assert led_by_none.wait(5) == 0
    own_session, detached = started("dead", "8", "setsid sleep 300 & echo $!; wait")
    wait_for(lambda: os.getsid(detached) == detached, what="the setsid child in a session of its own")
    finished, daemon = started("dead", "6", "sleep 300 & echo $!; wait")  # a job that ended long ago
    other, others_child = started("alive", "7", "sleep 300 & echo $!; wait")

    server_module.kill_processes_of({(7, "dead"), (8, "dead")})
    assert step.wait(5) == -signal.SIGKILL and own_session.wait(5) == -signal.SIGKILL
    assert_gone(child, orphan, detached)
    assert all(map(alive, (finished.pid, daemon, other.pid, others_child))), "other jobs' processes go on"
    for survivor in (finished, other):
        os.killpg(survivor.pid, signal.SIGKILL)
        survivor.wait(5)


def test_a_full_queue_is_503(make_app, tmp_path):
    """--max-pending counts the Pending jobs (here the one that max_concurrent holds back), not Executing ones."""
    client = make_app(LIMITED, MAX_PENDING=1)
    first = make_fifo(tmp_path, "first")
    one = trigger(client, "limited", Fifo=str(first))
    wait_for(lambda: status_of(client, one) == "Executing", what="the first limited job to start")
    two = trigger(client, "quick")
    assert final_status(client, two) == "Succeeded"
    third = make_fifo(tmp_path, "third")
    three = trigger(client, "limited", Fifo=str(third))  # stays Pending behind the first
    response = call(client, "GET", "/api/jobs/trigger", {"template": "quick"}, status=503)
    assert response.text.strip()
    release(first)
    assert final_status(client, one) == "Succeeded"
    release(third)
    assert final_status(client, three) == "Succeeded"
    assert final_status(client, trigger(client, "quick")) == "Succeeded"


def test_pending_jobs_keep_their_template_over_a_reload(make_app, tmp_path):
    client = make_app(LIMITED)
    first, second = make_fifo(tmp_path, "first"), make_fifo(tmp_path, "second")
    one = trigger(client, "limited", Fifo=str(first))
    two = trigger(client, "limited", Fifo=str(second))
    wait_for(lambda: status_of(client, one) == "Executing", what="the first limited job to start")
    assert status_of(client, two) == "Pending"
    catalog = client.app.extensions["jobserver"].catalog
    catalog.path.write_text('[limited]\n[limited.variables]\nFifo = ""\n[[limited.steps]]\nlog = "new version $Fifo"\n')
    catalog.reload()
    three = trigger(client, "limited", Fifo="third")
    release(first)
    release(second)
    assert final_status(client, one) == "Succeeded" and final_status(client, two) == "Succeeded"
    assert logs_of(client, two) == "INFO: got go\n"
    assert final_status(client, three) == "Succeeded"
    assert logs_of(client, three) == "INFO: new version third\n"


def test_a_job_with_stored_entries_is_never_pending(make_app):
    """Its entries are flushed every 5,000: it is marked Executing first, so that after a crash it is ended
    rather than run again (a second run collided with the entries of the first and was stuck in Pending)."""
    client = make_app(LIMITED)
    token = trigger(client, "biglog")
    seen = []

    def final():
        (status, count), = query(client, "SELECT status, (SELECT count(*) FROM logs WHERE job_id = id) "
                                         "FROM jobs WHERE id = ?", int(token))
        seen.append((status, count))
        return status in FINAL

    wait_for(final, interval=0.001, what="the job to end")
    assert not any(status == "Pending" and count for status, count in seen), seen
    assert final_status(client, token) == "Succeeded"
    assert len(logs_of(client, token).splitlines()) == 6000

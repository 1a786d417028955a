"""What an operator sees: job events on stderr (text and JSON lines, never a key, a secret or a variable's
value), the health check, and the Prometheus metrics."""

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, final_status, wait_for, wait_for_log

SECRET, KEY = "hunter2-secret-Zq9", "operator-key-Kx7"

TEMPLATES = f"""
[hello]
[hello.variables]
Name = "world"
[[hello.steps]]
log = "hello $Name"

[deploy]
key = "{KEY}"
[deploy.variables]
Password = {{ secret = true, default = "" }}
Target = "staging"
[[deploy.steps]]
run = 'echo "deploying $Target with $Password"'

[failing]
[[failing.steps]]
name = "prepare"
log = "preparing"
[[failing.steps]]
name = "build"
run = 'exit 3'

[slow]
timeout = 0.5
[[slow.steps]]
name = "wait"
run = 'sleep 30'

[sleeper]
[sleeper.variables]
Dir = ""
[[sleeper.steps]]
run = 'echo started; sleep 30'
"""


def event_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " INFO " in line or " WARNING " in line or " ERROR " in line]


def test_each_job_event_is_one_text_line_with_its_fields_and_no_secret(start_server, tmp_path):
    server = start_server(TEMPLATES, "--cancel-grace", "0.2")
    hello = server.trigger("hello", Name="value-never-logged")
    deploy = server.trigger("deploy", key=KEY, Password=SECRET, Target="target-never-logged")
    failing, slow = server.trigger("failing"), server.trigger("slow")
    sleeper = server.trigger("sleeper")
    for token in (hello, failing, slow):
        server.final_status(token)
    server.final_status(deploy, key=KEY)
    wait_for_log(server, sleeper, "started")
    assert server.get("/api/jobs/cancel", token=sleeper)[1] == "Error"
    assert server.get("/api/jobs/trigger", template="hello", key="wrong")[0] == 200  # no key: keys ignored
    assert server.get("/api/jobs/status", token=deploy, key="wrong-" + KEY)[0] == 403
    refused = server.request("GET", "/api/jobs/trigger?template=hello",
                             headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert refused[0] == 403
    # the lines reach stderr within a tenth of a second (the writer's batch)
    wait_for(lambda: "request refused" in server.stderr() and f"job finished: token={sleeper} " in server.stderr(),
             10, what="the last event lines")
    stderr = server.stderr()
    assert SECRET not in stderr and KEY not in stderr and "never-logged" not in stderr, stderr
    lines = event_lines(stderr)

    def one(*parts):
        found = [line for line in lines if all(part in line for part in parts)]
        assert found, f"no event line with {parts}:\n" + "\n".join(lines)
        return found[0]

    one(f"job triggered: token={hello} template=hello client=127.0.0.1 via=api")
    one(f"job started: token={hello} template=hello instance=")
    assert "duration=" in one(f"job finished: token={hello} template=hello status=Succeeded")
    one(f"job finished: token={failing} template=failing status=Error", "step=build exit_code=3")
    one(f"job finished: token={slow} template=slow status=Error", "step=wait reason=timeout")
    one(f"job finished: token={sleeper} template=sleeper status=Error", "reason=cancel")
    one("WARNING request refused: rule=cross-site source=http://evil.example path=/api/jobs/trigger")

    server.templates.write_text(TEMPLATES.replace("[hello]", "[hello2]\n[[hello2.steps]]\nlog = 'x'\n\n[hello]"))
    wait_for(lambda: "templates reloaded" in server.stderr(), 10, what="the reload event")
    assert "added=hello2" in server.stderr()
    server.templates.write_text("this is [not toml")
    wait_for(lambda: "templates not reloaded" in server.stderr(), 10, what="the refused reload event")
    assert "invalid TOML" in event_lines(server.stderr())[-1]
    assert server.stop() == 0
    assert "INFO stopped" in server.stderr()


def test_json_lines_have_stable_fields(start_server):
    server = start_server(TEMPLATES, "--log-format", "json")
    token = server.trigger("failing")
    assert server.final_status(token) == "Error"
    assert server.stop() == 0
    records = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "event", "message"} <= set(record) for record in records)
    by_event = {record["event"]: record for record in records}
    assert by_event["job.triggered"] == {**by_event["job.triggered"], "token": int(token), "template": "failing",
                                         "client": "127.0.0.1", "via": "api", "level": "info"}
    finished = by_event["job.finished"]
    assert (finished["status"], finished["step"], finished["exit_code"], finished["level"]) == (
        "Error", "build", 3, "warning")
    assert isinstance(finished["duration"], float)
    assert by_event["server.stopped"]["message"] == "stopped"


DRIVER_LOGS = """
import logging, app
writer = app.configure_logging({level!r}, {form!r})
logging.getLogger("psycopg.pool").warning("error connecting in 'jobserver': connection refused")
logging.getLogger("psycopg.pool").info("connection added to pool 'jobserver'")
writer.stop()
"""


@pytest.mark.parametrize("level, form", [("info", "json"), ("debug", "text")])
def test_the_database_drivers_messages_come_in_the_servers_format(level, form):
    # The pool's warnings (reconnects) must reach a log shipper as JSON like every other line, and its
    # routine INFO lines only when asked for with debug.
    result = subprocess.run([sys.executable, "-c", DRIVER_LOGS.format(level=level, form=form)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    lines = result.stderr.splitlines()
    if form == "json":
        assert [json.loads(line)["event"] for line in lines] == ["psycopg.pool"], lines
        assert json.loads(lines[0])["level"] == "warning"
    else:
        assert [line.split(" ", 3)[2] for line in lines] == ["WARNING", "INFO"], lines


def test_log_level_warning_keeps_only_warnings(start_server):
    server = start_server(TEMPLATES, "--log-level", "warning")
    ok, failing = server.trigger("hello"), server.trigger("failing")
    server.final_status(ok)
    server.final_status(failing)
    assert server.stop() == 0
    lines = event_lines(server.stderr())
    assert not [line for line in lines if " INFO " in line], lines
    assert any(f"job finished: token={failing}" in line for line in lines), lines


def test_log_level_debug_adds_each_request_without_its_query(start_server):
    server = start_server(TEMPLATES, "--log-level", "debug")
    token = server.trigger("deploy", key=KEY, Password=SECRET)
    server.final_status(token, key=KEY)
    wait_for(lambda: "request answered: method=GET path=/api/jobs/trigger status=200" in server.stderr(), 10,
             what="the request's debug line")
    assert KEY not in server.stderr() and SECRET not in server.stderr()


def test_a_job_triggered_from_the_page_is_logged_as_such(make_app, caplog):
    client = make_app(TEMPLATES)
    form = client.get("/templates/hello").forms["run-form"]
    form["Name"] = "from-the-page"
    with caplog.at_level(logging.INFO, logger="jobserver"):
        response = form.submit(status=303)
        token = response.headers["Location"].rsplit("/", 1)[1]
        final_status(client, token)
    [triggered] = [r for r in caplog.records if getattr(r, "event", "") == "job.triggered"]
    assert (triggered.fields["token"], triggered.fields["template"], triggered.fields["via"]) == (
        int(token), "hello", "page")
    assert not any("from-the-page" in record.getMessage() + json.dumps(getattr(record, "fields", {}))
                   for record in caplog.records)


#
# Health.
#


def test_health_is_ok_then_503_while_another_program_locks_the_database_then_ok(make_app, tmp_path):
    client = make_app(TEMPLATES)
    assert (client.get("/healthz").status_int, client.get("/healthz").text) == (200, "ok")
    locker = sqlite3.connect(tmp_path / "jobs.db", timeout=1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        response = client.get("/healthz", status=503)
        assert "cannot be written" in response.text and "locked" in response.text, response.text
        assert response.headers["Retry-After"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert client.get("/healthz").text == "ok", "well again without a restart"


def test_health_is_503_while_writes_fail_and_ok_once_one_succeeds(make_app, monkeypatch):
    """A full disk, as the store sees it: every write fails with SQLite's own error until space comes back."""
    client = make_app(TEMPLATES)
    store = client.app.extensions["jobserver"].store
    with monkeypatch.context() as patch:
        patch.setattr(store._group, "run", lambda operation: (_ for _ in ()).throw(
            sqlite3.OperationalError("database or disk is full")))
        client.get("/api/jobs/trigger", {"template": "hello"}, status=503)
        assert "cannot be written: database or disk is full" in client.get("/healthz", status=503).text
    assert final_status(client, client.get("/api/jobs/trigger", {"template": "hello"}).text) == "Succeeded"
    assert client.get("/healthz").text == "ok"


def test_health_is_503_when_the_workers_have_stopped(make_app):
    client = make_app(TEMPLATES)
    runner = client.app.extensions["jobserver"].runner
    runner.stopping.set()
    with runner.lock:
        runner.lock.notify_all()
    wait_for(lambda: not runner.alive(), 10, what="the workers to stop")
    assert client.get("/healthz", status=503).text == "the job workers have stopped"


def test_health_is_503_during_shutdown(start_server, tmp_path):
    server = start_server(TEMPLATES, "--grace", "20")
    token = server.trigger("sleeper")
    wait_for_log(server, token, "started")
    assert server.get("/healthz")[:2] == (200, "ok")
    server.signal(signal.SIGTERM)
    wait_for(lambda: server.get("/healthz")[0] == 503, 10, what="the health check to say 503")
    assert server.get("/healthz")[1] == "shutting down"
    server.signal(signal.SIGTERM)  # no more grace
    assert server.wait(30) == 0


#
# Metrics.
#


def metrics_of(client) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample /metrics gives, read by prometheus_client."""
    response = client.get("/metrics")
    assert response.content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_what_ran(make_app):
    client = make_app(TEMPLATES)
    tokens = [client.get("/api/jobs/trigger", {"template": "hello"}).text for _ in range(2)]
    tokens.append(client.get("/api/jobs/trigger", {"template": "failing"}).text)
    tokens.append(client.get("/api/jobs/trigger", {"template": "deploy", "key": KEY, "Password": SECRET}).text)
    for token in tokens:
        final_status(client, token, key=KEY)
    client.get("/api/jobs/status", {"token": tokens[-1], "key": "wrong"}, status=403)
    client.get("/api/jobs/trigger", {"template": "hello"}, headers={"Sec-Fetch-Site": "cross-site"}, status=403)
    client.get("/api/jobs/trigger", {"template": "hello"}, headers={"Host": "evil.example"}, status=403)
    def counted(samples):  # a job's end is told to its waiters once committed; its worker counts it just after
        ends = sum(value for (name, _), value in samples.items() if name == "jobserver_jobs_finished_total")
        return ends == len(tokens) and samples[("jobserver_jobs_executing", ())] == 0 and samples

    samples = wait_for(lambda: counted(metrics_of(client)), what="the jobs' ends to be counted")
    text = client.get("/metrics").text
    assert SECRET not in text and KEY not in text

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    assert value("jobserver_jobs_triggered_total", template="hello", via="api") == 2
    assert value("jobserver_jobs_triggered_total", template="failing", via="api") == 1
    assert value("jobserver_jobs_finished_total", template="hello", status="Succeeded") == 2
    assert value("jobserver_jobs_finished_total", template="failing", status="Error") == 1
    assert value("jobserver_jobs_finished_total", template="deploy", status="Succeeded") == 1
    assert value("jobserver_job_duration_seconds_count", template="hello") == 2
    stored = sum(len(client.get("/api/jobs/logs", {"token": t, "key": KEY}).text.splitlines()) for t in tokens)
    assert value("jobserver_log_entries_stored_total") == stored
    assert value("jobserver_requests_refused_total", rule="cross-site") == 1
    assert value("jobserver_requests_refused_total", rule="host") == 1
    assert value("jobserver_http_requests_total", endpoint="/api/jobs/trigger", code="200") == 4
    assert value("jobserver_http_requests_total", endpoint="/api/jobs/status", code="403") == 1
    assert value("jobserver_jobs_pending") == 0 and value("jobserver_jobs_executing") == 0
    assert value("jobserver_workers", state="idle") == 2 and value("jobserver_workers", state="busy") == 0
    assert ("jobserver_long_polls_waiting", ()) in samples and ("jobserver_store_errors_total", ()) in samples


def test_a_template_no_longer_in_force_is_counted_as_other(make_app, tmp_path):
    client = make_app(TEMPLATES)
    token = client.get("/api/jobs/trigger", {"template": "sleeper"}).text
    wait_for(lambda: client.get("/api/jobs/status", {"token": token}).text == "Executing", 10)
    assert metrics_of(client)[("jobserver_jobs_triggered_total", (("template", "sleeper"), ("via", "api")))] == 1
    catalog = client.app.extensions["jobserver"].catalog
    catalog.path.write_text(TEMPLATES.split("[sleeper]")[0])
    catalog.reload()
    assert client.get("/api/jobs/cancel", {"token": token}).text == "Error"
    samples = metrics_of(client)
    assert samples[("jobserver_jobs_finished_total", (("status", "Error"), ("template", "other")))] == 1
    assert not [name for name, labels in samples if ("template", "sleeper") in labels], "no series names it"


def test_long_polls_are_counted_while_they_wait(make_app):
    client = make_app(TEMPLATES)
    token = client.get("/api/jobs/trigger", {"template": "sleeper"}).text
    watch = client.app.extensions["jobserver"].watch
    waiter = threading.Thread(target=client.get, args=("/api/jobs/status", {"token": token, "wait": 10}))
    waiter.start()
    wait_for(lambda: watch.waiting == 1, 10, what="the long poll to wait")
    assert metrics_of(client)[("jobserver_long_polls_waiting", ())] == 1
    client.get("/api/jobs/cancel", {"token": token})
    waiter.join(15)
    assert metrics_of(client)[("jobserver_long_polls_waiting", ())] == 0

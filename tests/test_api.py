"""The HTTP API in process (WebTest): trigger/status/logs, keys, variables, logs, the runner's results, and the
job control extensions that need no real server (offset, /api/templates, secrets, max_concurrent)."""

import contextlib
import errno
import json
import os
import re
import sqlite3
import textwrap
import urllib.parse

import pytest
import webtest

import app as server_module
import conftest
from app import TemplateError
from conftest import ROOT, final_status, store_database, wait_for



@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Every test of this file runs on both stores."""
    return store_database(request.param, request, tmp_path)


FORM = "application/x-www-form-urlencoded"
TEXT = "text/plain; charset=utf-8"
FINAL = ("Succeeded", "Warning", "Error")

#
# Helpers.
#


def call(client, method, path, params=(), status=200, headers=None):
    """One request with its parameters in the query string (GET) or a form body (POST); checks the status
    and that the response is plain UTF-8 text."""
    if method == "GET":
        response = client.get(path, list(params.items()) if isinstance(params, dict) else list(params),
                              headers=headers, status=status)
    else:
        body = urllib.parse.urlencode(list(params.items()) if isinstance(params, dict) else list(params))
        response = client.post(path, body, headers=headers, status=status, content_type=FORM)
    assert response.headers["Content-Type"] == TEXT, response.headers
    return response


def trigger(client, template, key=None, status=200, **variables):
    params = {"template": template, **variables}
    if key is not None:
        params["key"] = key
    response = call(client, "GET", "/api/jobs/trigger", params, status=status)
    if status == 200:
        assert re.fullmatch(r"[0-9]+", response.text), response.text
    return response.text


def status_of(client, token, key=None):
    params = {"token": token} if key is None else {"token": token, "key": key}
    return call(client, "GET", "/api/jobs/status", params).text


def logs_of(client, token, key=None, **extra):
    params = {"token": token, **extra}
    if key is not None:
        params["key"] = key
    return call(client, "GET", "/api/jobs/logs", params).text


def run_job(client, template, key=None, **variables):
    """Trigger, wait until final; (token, status, logs)."""
    token = trigger(client, template, key=key, **variables)
    return token, final_status(client, token, key=key), logs_of(client, token, key=key)


def database_of(client) -> str:
    return client.app.config["DATABASE"]


def query(client, sql, *args):
    return conftest.query(database_of(client), sql, *args)


def catalog(client):
    return client.app.extensions["jobserver"].catalog


def replace_templates(client, text):
    """Write a new templates file and load it at once."""
    templates = catalog(client)
    templates.path.write_text(textwrap.dedent(text))
    templates.reload()


def make_fifo(tmp_path, name):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def fifo_has_reader(path) -> bool:
    """Whether a process has the fifo open for reading. Opening it for writing releases that reader (it reads
    EOF when we close), so only ask this of a fifo that must have no reader."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ENXIO:
            return False
        raise
    os.close(descriptor)
    return True


def release(path, line=b"go\n", timeout=10):
    """Wait until a job reads the fifo, then give it one line."""

    def open_for_writing():
        try:
            return [os.open(path, os.O_WRONLY | os.O_NONBLOCK)]
        except OSError as error:
            if error.errno == errno.ENXIO:
                return None
            raise

    descriptor = wait_for(open_for_writing, timeout, what=f"a job reading {path}")[0]
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


TEMPLATES = '''
[open]
description = "No key"
[[open.steps]]
log = "open job"

[locked]
description = "Has a key"
key = "s3cret"
[[locked.steps]]
log = "locked job"

[other]
key = "other-key"
[[other.steps]]
log = "other job"

[hidden]
api = false
description = "Not for the API"
[[hidden.steps]]
log = "hidden job"
'''

#
# The tables of refused requests share one app per module (one per test would cost most of this file's run
# time); they assert that a refused request adds no job.
#


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared(tmp_path_factory, request):
    directory = tmp_path_factory.mktemp("shared-app")
    path = directory / "templates.toml"
    path.write_text(textwrap.dedent(TEMPLATES + VARIABLES + FOLLOW))
    if request.param == "postgresql":
        postgres = request.getfixturevalue("postgres")
        database = postgres.create_database("shared_api_app")
    else:
        database = str(directory / "jobs.db")
    flask_app = server_module.create_app({"DATABASE": database, "TEMPLATES": str(path), "WORKERS": 2})
    yield webtest.TestApp(flask_app)
    server_module.shutdown_app(flask_app, grace=5)


def job_count(client) -> int:
    return query(client, "SELECT count(*) FROM jobs")[0][0]


#
# Status codes of trigger, status and logs, GET and POST.
#

METHODS = ["GET", "POST"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("params, expected", [
    ({"template": "open"}, 200),
    ({"template": "open", "key": ""}, 200),
    ({"template": "open", "key": "anything"}, 200),
    ({"template": "OPEN"}, 200),
    ({"template": "locked", "key": "s3cret"}, 200),
    ({}, 400),
    ({"template": ""}, 400),
    ({"key": "s3cret"}, 400),
    ({"template": "nope"}, 404),
    ({"template": "nope", "key": "s3cret"}, 404),
    ({"template": "locked"}, 403),
    ({"template": "locked", "key": ""}, 403),
    ({"template": "locked", "key": "wrong"}, 403),
    ({"template": "locked", "key": "S3CRET"}, 403),
    ({"template": "locked", "key": "s3cret "}, 403),
    ({"template": "locked", "key": "other-key"}, 403),
    ({"template": "hidden"}, 403),
    ({"template": "hidden", "key": ""}, 403),
])
def test_trigger_status_codes(shared, method, params, expected):
    client = shared
    before = job_count(client)
    response = call(client, method, "/api/jobs/trigger", params, status=expected)
    if expected == 200:
        assert re.fullmatch(r"[1-9][0-9]*", response.text)
        assert query(client, "SELECT template FROM jobs WHERE id = ?", int(response.text)) == \
            [(params["template"].lower(),)]
        assert job_count(client) == before + 1
    else:
        assert response.text.strip(), "an error response carries a reason"
        assert job_count(client) == before


def test_trigger_error_reasons(make_app):
    client = make_app(TEMPLATES)
    assert "template" in trigger(client, "", status=400).lower()
    assert "nope" in trigger(client, "nope", status=404)
    assert "key" in trigger(client, "locked", status=403).lower()
    assert "key" in trigger(client, "locked", key="wrong", status=403).lower()
    assert "hidden" in trigger(client, "hidden", status=403)


@pytest.mark.parametrize("endpoint", ["/api/jobs/status", "/api/jobs/logs"])
@pytest.mark.parametrize("method", METHODS)
def test_status_and_logs_status_codes(make_app, endpoint, method):
    client = make_app(TEMPLATES)
    open_token = trigger(client, "open")
    locked_token = trigger(client, "locked", key="s3cret")
    final_status(client, open_token)
    final_status(client, locked_token, key="s3cret")
    ok = {
        "status": {open_token: "Succeeded", locked_token: "Succeeded"},
        "logs": {open_token: "INFO: open job\n", locked_token: "INFO: locked job\n"},
    }[endpoint.rsplit("/", 1)[1]]

    def check(params, expected):
        response = call(client, method, endpoint, params, status=expected)
        if expected == 200:
            assert response.text == ok[params["token"]]
        else:
            assert response.text.strip()
        return response

    check({"token": open_token}, 200)
    check({"token": open_token, "key": ""}, 200)
    check({"token": open_token, "key": "whatever"}, 200)  # the job's template had no key
    check({"token": locked_token, "key": "s3cret"}, 200)
    check({}, 400)
    check({"key": "s3cret"}, 400)
    for malformed in ["", "abc", "-1", "1.5", " 1", "1 ", "+1", "0x1", "1e3", "\uff11", "9" * 30]:
        check({"token": malformed}, 400)
    check({"token": "999999"}, 400)
    check({"token": "999999", "key": "s3cret"}, 400)
    check({"token": "0"}, 400)
    check({"token": locked_token}, 403)
    check({"token": locked_token, "key": ""}, 403)
    check({"token": locked_token, "key": "wrong"}, 403)
    check({"token": locked_token, "key": "other-key"}, 403)


#
# Key sources, and which key counts.
#


def send_key(client, path, params, key, source, status):
    """A request whose key comes from one of the three sources (query/form parameter, header, JSON body)."""
    if source == "query":
        return client.get(path, {**params, "key": key}, status=status)
    if source == "form":
        return client.post(path, urllib.parse.urlencode({**params, "key": key}), content_type=FORM, status=status)
    if source == "header":
        return client.get(path, params, headers={"X-ApiKey": key}, status=status)
    if source == "json":
        return client.post_json(path, {**params, "API_Key": key}, status=status)
    if source == "json-query":
        return client.post_json(path + "?" + urllib.parse.urlencode(params), {"API_Key": key}, status=status)
    raise AssertionError(source)


KEY_SOURCES = ["query", "form", "header", "json", "json-query"]


@pytest.mark.parametrize("source", KEY_SOURCES)
def test_each_key_source(make_app, source):
    client = make_app(TEMPLATES)
    response = send_key(client, "/api/jobs/trigger", {"template": "locked"}, "s3cret", source, 200)
    token = response.text
    assert re.fullmatch(r"[0-9]+", token)
    assert response.headers["Content-Type"] == TEXT
    send_key(client, "/api/jobs/trigger", {"template": "locked"}, "wrong", source, 403)
    send_key(client, "/api/jobs/trigger", {"template": "locked"}, "other-key", source, 403)
    final_status(client, token, key="s3cret")
    assert send_key(client, "/api/jobs/status", {"token": token}, "s3cret", source, 200).text == "Succeeded"
    assert send_key(client, "/api/jobs/logs", {"token": token}, "s3cret", source, 200).text == "INFO: locked job\n"
    for path in ("/api/jobs/status", "/api/jobs/logs"):
        send_key(client, path, {"token": token}, "wrong", source, 403)
        send_key(client, path, {"token": token}, "other-key", source, 403)


def test_empty_header_key_is_missing(make_app):
    client = make_app(TEMPLATES)
    client.get("/api/jobs/trigger", {"template": "locked"}, headers={"X-ApiKey": ""}, status=403)
    client.get("/api/jobs/trigger", {"template": "open"}, headers={"X-ApiKey": ""}, status=200)


def test_key_is_compared_per_template(make_app):
    client = make_app(TEMPLATES)
    locked = trigger(client, "locked", key="s3cret")
    other = trigger(client, "other", key="other-key")
    trigger(client, "locked", key="other-key", status=403)
    trigger(client, "other", key="s3cret", status=403)
    assert final_status(client, locked, key="s3cret") == "Succeeded"
    assert final_status(client, other, key="other-key") == "Succeeded"
    call(client, "GET", "/api/jobs/status", {"token": locked, "key": "other-key"}, status=403)
    call(client, "GET", "/api/jobs/logs", {"token": other, "key": "s3cret"}, status=403)


def test_key_env_supplies_the_key(make_app, monkeypatch):
    monkeypatch.setenv("API_TEST_TEMPLATE_KEY", "from-env")
    client = make_app('''
        [envkey]
        key_env = "API_TEST_TEMPLATE_KEY"
        [[envkey.steps]]
        log = "ok"
    ''')
    trigger(client, "envkey", status=403)
    trigger(client, "envkey", key="API_TEST_TEMPLATE_KEY", status=403)
    token = trigger(client, "envkey", key="from-env")
    assert final_status(client, token, key="from-env") == "Succeeded"


KEY_V1 = '''
[rotated]
key = "old-key"
[[rotated.steps]]
log = "rotated v1"

[gains-key]
[[gains-key.steps]]
log = "gains v1"

[loses-key]
key = "lost-key"
[[loses-key.steps]]
log = "loses v1"
'''

KEY_V2 = '''
[rotated]
key = "new-key"
[[rotated.steps]]
log = "rotated v2"

[gains-key]
key = "now-keyed"
[[gains-key.steps]]
log = "gains v2"

[loses-key]
[[loses-key.steps]]
log = "loses v2"
'''


def test_the_key_that_counts_is_the_one_at_trigger_time(make_app):
    client = make_app(KEY_V1)
    rotated = trigger(client, "rotated", key="old-key")
    gains = trigger(client, "gains-key")
    loses = trigger(client, "loses-key", key="lost-key")
    for token, key in ((rotated, "old-key"), (gains, None), (loses, "lost-key")):
        final_status(client, token, key=key)

    replace_templates(client, KEY_V2)

    # Jobs triggered before: their own template's key.
    assert status_of(client, rotated, key="old-key") == "Succeeded"
    assert logs_of(client, rotated, key="old-key") == "INFO: rotated v1\n"
    call(client, "GET", "/api/jobs/status", {"token": rotated, "key": "new-key"}, status=403)
    call(client, "POST", "/api/jobs/logs", {"token": rotated, "key": "new-key"}, status=403)
    assert status_of(client, gains) == "Succeeded"
    assert logs_of(client, gains) == "INFO: gains v1\n"
    call(client, "GET", "/api/jobs/status", {"token": loses}, status=403)
    call(client, "GET", "/api/jobs/logs", {"token": loses}, status=403)
    assert status_of(client, loses, key="lost-key") == "Succeeded"

    # New jobs: the new keys.
    trigger(client, "rotated", key="old-key", status=403)
    new_rotated = trigger(client, "rotated", key="new-key")
    assert final_status(client, new_rotated, key="new-key") == "Succeeded"
    assert logs_of(client, new_rotated, key="new-key") == "INFO: rotated v2\n"
    call(client, "GET", "/api/jobs/status", {"token": new_rotated, "key": "old-key"}, status=403)
    trigger(client, "gains-key", status=403)
    new_loses = trigger(client, "loses-key")
    assert final_status(client, new_loses) == "Succeeded"


def test_a_bad_reload_keeps_the_templates_in_force(make_app):
    client = make_app(KEY_V1)
    templates = catalog(client)
    templates.path.write_text('[rotated]\nkey = "bad"\n[[rotated.steps]]\nlog = "$Undeclared"\n')
    with pytest.raises(TemplateError):
        templates.reload()
    trigger(client, "rotated", key="bad", status=403)
    token = trigger(client, "rotated", key="old-key")
    assert final_status(client, token, key="old-key") == "Succeeded"
    assert logs_of(client, token, key="old-key") == "INFO: rotated v1\n"


#
# Otter's two documented examples, against the repository's own templates.toml.
#


def test_otter_example_get_hdars(make_app):
    client = make_app("", TEMPLATES=str(ROOT / "templates.toml"))
    response = client.get("/api/jobs/trigger?template=hdars&key=secure123", status=200)
    assert response.headers["Content-Type"] == TEXT
    assert re.fullmatch(r"[0-9]+", response.text), repr(response.text)
    token = response.text
    client.get(f"/api/jobs/status?token={token}", status=403)
    status = client.get(f"/api/jobs/status?token={token}&key=secure123&wait=20", status=200)
    assert status.headers["Content-Type"] == TEXT
    assert status.text == "Succeeded"
    logs = client.get(f"/api/jobs/logs?token={token}&key=secure123", status=200)
    assert logs.headers["Content-Type"] == TEXT
    assert logs.text.startswith("INFO: Restarting HDARS on HDARSV1\n")
    assert logs.text.endswith("INFO: hdars restarted\n")
    assert "INFO: systemctl restart hdars on HDARSV1\n" in logs.text


def test_otter_example_post_ablast(make_app):
    client = make_app("", TEMPLATES=str(ROOT / "templates.toml"))
    response = client.post("/api/jobs/trigger?template=ablast",
                           "TargetServer=ABLSV1&SendNotification=sdennis@example.com", content_type=FORM, status=200)
    assert response.headers["Content-Type"] == TEXT
    assert re.fullmatch(r"[0-9]+", response.text), repr(response.text)
    token = response.text
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token) == (
        "INFO: Blasting the ABL cache on ABLSV1\n"
        "INFO: cache cleared on ABLSV1\n"
        "INFO: would notify sdennis@example.com\n"
    )
    # The same request with other values really uses them.
    other = client.post("/api/jobs/trigger?template=ablast", "TargetServer=OTHER7&SendNotification=a@b.example",
                        content_type=FORM, status=200).text
    assert final_status(client, other) == "Succeeded"
    assert logs_of(client, other) == (
        "INFO: Blasting the ABL cache on OTHER7\nINFO: cache cleared on OTHER7\nINFO: would notify a@b.example\n"
    )
    assert int(other) > int(token)
    # And a value the template's pattern refuses is a 400 naming the variable.
    response = client.post("/api/jobs/trigger?template=ablast", "TargetServer=ABL;reboot&SendNotification=",
                           content_type=FORM, status=400)
    assert response.headers["Content-Type"] == TEXT
    assert "TargetServer" in response.text


#
# Variables.
#

VARIABLES = '''
[vars]
[vars.variables]
Target = "default-target"
Count = { default = "1", pattern = '[0-9]+' }
Color = { default = "red", choices = ["red", "green"] }
[[vars.steps]]
log = "log: Target=$Target Count=${Count} Color=$color"
[[vars.steps]]
run = 'echo "run: Target=$Target Count=$Count Color=$Color"'
[[vars.steps]]
exec = ["echo", "exec: Target=$TARGET", "Count=${count}"]

[needs]
[needs.variables]
Name = { required = true }
Fallback = { default = "given", required = true }
[[needs.steps]]
log = "Name=$Name Fallback=$Fallback"

[free]
allow_new_variables = true
[[free.steps]]
run = 'echo "Extra=${Extra-unset} extra=${extra-unset}"'

[builtins]
[[builtins.steps]]
log = "log: $JobToken $TemplateName"
[[builtins.steps]]
run = 'echo "run: $JobToken $TemplateName"'
[[builtins.steps]]
exec = ["echo", "exec: ${JobToken}", "$templatename"]
'''


def expected_vars_log(target, count, color):
    return (f"INFO: log: Target={target} Count={count} Color={color}\n"
            f"INFO: run: Target={target} Count={count} Color={color}\n"
            f"INFO: exec: Target={target} Count={count}\n")


def test_defaults_when_nothing_is_given(make_app):
    client = make_app(VARIABLES)
    _, status, logs = run_job(client, "vars")
    assert status == "Succeeded"
    assert logs == expected_vars_log("default-target", "1", "red")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("names", [
    ("Target", "Count", "Color"),
    ("target", "COUNT", "cOlOr"),
    ("$Target", "$count", "$COLOR"),
])
def test_variables_override_defaults(make_app, method, names):
    client = make_app(VARIABLES)
    params = {"template": "vars", names[0]: "web-01", names[1]: "42", names[2]: "green"}
    token = call(client, method, "/api/jobs/trigger", params).text
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token) == expected_vars_log("web-01", "42", "green")


def test_variables_from_query_and_body_together(make_app):
    client = make_app(VARIABLES)
    token = client.post("/api/jobs/trigger?template=vars&Target=from-query", "Count=7", content_type=FORM).text
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token) == expected_vars_log("from-query", "7", "red")


def test_variables_from_a_json_body(make_app):
    client = make_app(VARIABLES)
    token = client.post_json("/api/jobs/trigger", {"template": "vars", "Target": "json-target", "Count": 12}).text
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token) == expected_vars_log("json-target", "12", "red")


def test_builtin_variables(make_app):
    client = make_app(VARIABLES)
    token, status, logs = run_job(client, "builtins")
    assert status == "Succeeded"
    assert logs == f"INFO: log: {token} builtins\nINFO: run: {token} builtins\nINFO: exec: {token} builtins\n"


def test_variable_names_accepted_at_the_limits(make_app):
    client = make_app(VARIABLES)
    name = "V" * 50
    token, status, _ = run_job(client, "free", **{name: "x", "_under": "y", "Extra": "z" * 8192})
    assert status == "Succeeded"


def test_undeclared_variable_accepted_when_allowed(make_app):
    client = make_app(VARIABLES)
    _, status, logs = run_job(client, "free", Extra="hello")
    assert status == "Succeeded"
    assert logs == "INFO: Extra=hello extra=unset\n"


def test_hundred_variables_accepted(make_app):
    client = make_app(VARIABLES)
    variables = {f"V{number}": str(number) for number in range(100)}
    _, status, _ = run_job(client, "free", **variables)
    assert status == "Succeeded"


# (template, request parameters after template=..., words the 400 body must contain)
INVALID_VARIABLES = [
    ("vars", [("Count", "12a")], ["Count", "pattern"]),
    ("vars", [("Count", "a12")], ["Count", "pattern"]),
    ("vars", [("Count", "1\n")], ["Count", "pattern"]),
    ("vars", [("Count", "-5")], ["Count", "pattern"]),
    ("vars", [("Color", "blue")], ["Color", "green"]),
    ("vars", [("Color", "RED")], ["Color", "green"]),
    ("vars", [("Color", "red ")], ["Color", "green"]),
    ("needs", [], ["Name", "required"]),
    ("needs", [("Name", "")], ["Name", "required"]),
    ("vars", [("Target", "x" * 8193)], ["Target", "KiB"]),
    ("vars", [("Target", "\u00e9" * 4097)], ["Target", "KiB"]),
    ("free", [("Extra", "x" * 8193)], ["Extra", "KiB"]),
    ("vars", [("Target", "a\x00b")], ["Target", "NUL"]),
    ("vars", [("Target", "a"), ("Target", "b")], ["Target", "once"]),
    ("vars", [("Target", "a"), ("target", "b")], ["arget", "once"]),
    ("vars", [("Target", "a"), ("$Target", "b")], ["Target", "once"]),
    ("vars", [("template", "vars")], ["template", "once"]),
    ("vars", [("Undeclared", "x")], ["Undeclared", "declared"]),
    ("vars", [("$Undeclared", "x")], ["Undeclared", "declared"]),
    ("free", [(f"V{number}", "x") for number in range(101)], ["100"]),
    ("free", [("bad-name", "x")], ["bad-name"]),
    ("free", [("9lives", "x")], ["9lives"]),
    ("free", [("V" * 51, "x")], ["VVVVVVVVVV"]),
    ("free", [("caf\u00e9", "x")], ["caf"]),
    ("free", [("", "x")], []),
    ("free", [("$", "x")], []),
    ("free", [("JobToken", "1")], ["JobToken"]),
    ("free", [("templatename", "x")], ["templatename"]),
]


@pytest.mark.parametrize("template, params, words", INVALID_VARIABLES,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(INVALID_VARIABLES)])
@pytest.mark.parametrize("method", METHODS)
def test_invalid_variables_are_400(shared, method, template, params, words):
    client = shared
    before = job_count(client)
    response = call(client, method, "/api/jobs/trigger", [("template", template), *params], status=400)
    for word in words:
        assert word in response.text, f"{word!r} not in {response.text!r}"
    assert job_count(client) == before


def test_duplicate_between_query_and_body(make_app):
    client = make_app(VARIABLES)
    response = client.post("/api/jobs/trigger?template=vars&Target=a", "target=b", content_type=FORM, status=400)
    assert "arget" in response.text
    response = client.post("/api/jobs/trigger?template=vars&Target=a", "Target=a", content_type=FORM, status=400)
    assert "Target" in response.text
    response = client.post("/api/jobs/trigger?template=vars", "template=vars", content_type=FORM, status=400)
    assert "template" in response.text
    client.post_json("/api/jobs/trigger?template=vars&Count=1", {"count": "2"}, status=400)


FORBIDDEN = [
    "PATH", "path", "Path", "HOME", "SHELL", "USER", "user", "IFS", "ENV", "BASH_ENV", "CDPATH", "PS4",
    "SHELLOPTS", "BASHOPTS", "TMPDIR", "tmpdir",
    "LD_PRELOAD", "ld_library_path", "LD_x", "DYLD_INSERT_LIBRARIES", "BASH_FUNC_x", "bash_x",
    "PYTHONPATH", "PythonStartup", "PYTHONx", "PERL5LIB", "PERLx", "RUBYOPT", "rubylib", "NODE_OPTIONS", "node_x",
    "GIT_SSH", "git_dir", "SSH_AUTH_SOCK", "LC_ALL", "lc_ctype",
    "HTTP_PROXY", "https_proxy", "X_PROXY", "no_Proxy",
    "$PATH", "$ld_preload", "$template", "$key", "$token", "$Template", "$KEY",
]


@pytest.mark.parametrize("name", FORBIDDEN)
def test_forbidden_variable_names(shared, name):
    # The template accepts any new variable, so the refusal can only come from the name itself.
    client = shared
    before = job_count(client)
    response = call(client, "GET", "/api/jobs/trigger", [("template", "free"), (name, "x")], status=400)
    assert name.lstrip("$") in response.text
    if name.lower() != "$template":  # else refused first as the template parameter given twice
        assert "reserved" in response.text
    response = client.post_json("/api/jobs/trigger", {"template": "free", name: "x"}, status=400)
    assert name.lstrip("$") in response.text
    assert job_count(client) == before


@pytest.mark.parametrize("name", ["PATH", "$home", "ld_preload", "HTTPS_PROXY"])
def test_forbidden_names_in_a_form_body_and_declared_templates(shared, name):
    client = shared
    call(client, "POST", "/api/jobs/trigger", [("template", "free"), (name, "x")], status=400)
    call(client, "POST", "/api/jobs/trigger", [("template", "vars"), (name, "x")], status=400)


def test_token_is_not_a_trigger_variable(make_app):
    """`token` is one of the API's parameter names, refused as a variable wherever it comes from."""
    client = make_app(VARIABLES)
    response = call(client, "GET", "/api/jobs/trigger", {"template": "free", "token": "5"}, status=400)
    assert "token" in response.text


def test_secret_values_never_appear_in_error_responses(make_app):
    client = make_app('''
        [pin]
        [pin.variables]
        Pin = { default = "0000", secret = true, pattern = '[0-9]{4}' }
        Level = { default = "low", secret = true, choices = ["low", "high-and-hidden"] }
        [[pin.steps]]
        log = "ok"
    ''')
    response = trigger(client, "pin", Pin="leak-me-1", status=400)
    assert "Pin" in response and "leak-me-1" not in response
    response = trigger(client, "pin", Level="leak-me-2", status=400)
    assert "Level" in response and "leak-me-2" not in response and "high-and-hidden" not in response


#
# Runner results: status words, log format, the step environment.
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

[missing-program]
[[missing-program.steps]]
exec = ["/nonexistent/program"]
[[missing-program.steps]]
log = "never logged"
'''


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
])
def test_status_words_and_log_format(make_app, template, expected_status, expected_logs):
    client = make_app(RUNNER)
    _, status, logs = run_job(client, template)
    assert status == expected_status
    assert logs == expected_logs


def test_an_error_log_step_makes_the_job_error(make_app):
    client = make_app(RUNNER)
    _, status, logs = run_job(client, "error-log")
    assert status == "Error"
    assert logs.startswith("ERROR: explicit error\n")


def test_a_program_that_cannot_start_is_an_error(make_app):
    client = make_app(RUNNER)
    _, status, logs = run_job(client, "missing-program")
    assert status == "Error"
    assert logs.startswith("ERROR: ") and "never logged" not in logs


def test_every_log_line_has_the_format(make_app):
    client = make_app(RUNNER)
    for template in ("succeeds", "warns", "fails", "continues", "levels"):
        _, _, logs = run_job(client, template)
        assert logs.endswith("\n")
        for line in logs.split("\n")[:-1]:
            assert re.fullmatch(r"(DEBUG|INFO|WARN|ERROR): .*", line), line


def test_the_step_environment_is_minimal(make_app, monkeypatch):
    monkeypatch.setenv("API_TEST_SERVER_ONLY", "must-not-leak")
    client = make_app('''
        [envcheck]
        [envcheck.variables]
        Target = "t1"
        [[envcheck.steps]]
        exec = ["env"]
        env = { STEP_EXTRA = "from-step", NUMBER = 5 }
        [[envcheck.steps]]
        run = 'echo "leak=${API_TEST_SERVER_ONLY-unset} extra=${STEP_EXTRA-unset} target=$Target"'
    ''')
    token, status, logs = run_job(client, "envcheck", Target="t2")
    assert status == "Succeeded"
    lines = [line.removeprefix("INFO: ") for line in logs.splitlines()]
    assert lines[-1] == "leak=unset extra=unset target=t2"  # a step's env is its own
    environment = dict(line.split("=", 1) for line in lines[:-1])
    assert set(environment) == {"PATH", "HOME", "LANG", "Target", "JobToken", "TemplateName", "STEP_EXTRA", "NUMBER"}
    assert environment["PATH"] and environment["HOME"] and environment["LANG"]
    assert environment["Target"] == "t2"
    assert environment["JobToken"] == token and environment["TemplateName"] == "envcheck"
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
    for method in METHODS:
        token = call(client, method, "/api/jobs/trigger", {"template": "meta", "Evil": value}).text
        assert final_status(client, token) == "Succeeded"
        logs = logs_of(client, token)
        lines = logs.splitlines()
        assert lines[0] == f"INFO: run:{value}"
        assert lines[1].startswith("INFO: run-unquoted:$(touch ")  # word-split and globbed, never executed
        assert lines[2] == f"INFO: exec:[{value}]"  # one argv element: the format was used once
        assert lines[3] == f"INFO: pre-{value}-post"
        assert lines[4] == f"INFO: log:{value}"
        assert len(lines) == 5
        assert not marker.exists()


#
# Logs: offset and the X-Log-Offset / X-Job-Complete headers.
#

FOLLOW = '''
[three]
[[three.steps]]
log = "one\\ntwo\\nthree"

[gated]
timeout = 30
[gated.variables]
Fifo = { required = true }
[[gated.steps]]
log = "waiting"
[[gated.steps]]
run = 'read line < "$Fifo"; echo "got $line"'
'''


@pytest.mark.parametrize("method", METHODS)
def test_logs_offset_and_headers(make_app, method):
    client = make_app(FOLLOW)
    token, status, _ = run_job(client, "three")
    assert status == "Succeeded"
    cases = [
        ({}, "INFO: one\nINFO: two\nINFO: three\n", "3"),
        ({"offset": "0"}, "INFO: one\nINFO: two\nINFO: three\n", "3"),
        ({"offset": "1"}, "INFO: two\nINFO: three\n", "3"),
        ({"offset": "2"}, "INFO: three\n", "3"),
        ({"offset": "3"}, "", "3"),
        ({"offset": "2", "wait": "5"}, "INFO: three\n", "3"),
        ({"offset": "3", "wait": "5"}, "", "3"),
    ]
    for extra, body, offset in cases:
        response = call(client, method, "/api/jobs/logs", {"token": token, **extra})
        assert response.text == body, extra
        assert response.headers["X-Log-Offset"] == offset, extra
        assert response.headers["X-Job-Complete"] == "true", extra
    response = call(client, method, "/api/jobs/logs", {"token": token, "offset": "10"})
    assert response.text == ""
    assert response.headers["X-Job-Complete"] == "true"
    assert "X-Log-Offset" in response.headers


def test_logs_of_a_running_job(make_app, tmp_path):
    client = make_app(FOLLOW)
    fifo = make_fifo(tmp_path, "gate")
    token = trigger(client, "gated", Fifo=str(fifo))

    def first_entry():
        response = call(client, "GET", "/api/jobs/logs", {"token": token})
        return response if response.text else None

    response = wait_for(first_entry, what="the first log entry of a running job")
    assert response.text == "INFO: waiting\n"
    assert response.headers["X-Log-Offset"] == "1"
    assert response.headers["X-Job-Complete"] == "false"
    assert status_of(client, token) == "Executing"
    response = call(client, "GET", "/api/jobs/logs", {"token": token, "offset": "1"})
    assert (response.text, response.headers["X-Log-Offset"], response.headers["X-Job-Complete"]) == ("", "1", "false")

    release(fifo)
    assert final_status(client, token) == "Succeeded"
    response = call(client, "GET", "/api/jobs/logs", {"token": token, "offset": "1"})
    assert response.text == "INFO: got go\n"
    assert response.headers["X-Log-Offset"] == "2"
    assert response.headers["X-Job-Complete"] == "true"


@pytest.mark.parametrize("endpoint, name, value", [
    ("/api/jobs/logs", "offset", "-1"),
    ("/api/jobs/logs", "offset", "x"),
    ("/api/jobs/logs", "offset", "1.5"),
    ("/api/jobs/logs", "offset", "1e3"),
    ("/api/jobs/logs", "offset", "inf"),
    ("/api/jobs/logs", "wait", "-1"),
    ("/api/jobs/logs", "wait", "soon"),
    ("/api/jobs/logs", "wait", "nan"),
    ("/api/jobs/logs", "wait", "inf"),
    ("/api/jobs/status", "wait", "-0.5"),
    ("/api/jobs/status", "wait", "x"),
    ("/api/jobs/status", "wait", "nan"),
])
def test_bad_offset_or_wait_is_400(shared, endpoint, name, value):
    client = shared
    token, _, _ = run_job(client, "three")
    response = call(client, "GET", endpoint, {"token": token, name: value}, status=400)
    assert name in response.text


#
# GET /api/templates.
#


def test_templates_endpoint(make_app):
    client = make_app(TEMPLATES + '''
        [described]
        description = "With variables"
        key = "described-key"
        [described.variables]
        Target = "web-01"
        Count = { default = "3", pattern = '[0-9]+', required = true }
        Color = { default = "red", choices = ["red", "green"] }
        Password = { default = "default-secret-value", secret = true }
        [[described.steps]]
        log = "x"
    ''')
    response = client.get("/api/templates", status=200)
    assert response.headers["Content-Type"].startswith("application/json")
    data = json.loads(response.text)
    assert isinstance(data, list)
    by_name = {entry["name"]: entry for entry in data}
    assert set(by_name) == {"open", "locked", "other", "described"}
    assert by_name["open"]["key_required"] is False
    assert by_name["locked"]["key_required"] is True
    assert by_name["open"]["description"] == "No key"
    variables = {v["name"]: v for v in by_name["described"]["variables"]}
    assert set(variables) == {"Target", "Count", "Color", "Password"}
    assert variables["Target"]["default"] == "web-01" and variables["Target"]["required"] is False
    assert variables["Count"]["pattern"] == "[0-9]+" and variables["Count"]["required"] is True
    assert variables["Color"]["choices"] == ["red", "green"]
    for secret in ("s3cret", "other-key", "described-key", "default-secret-value"):
        assert secret not in response.text
    assert "Not for the API" not in response.text
    assert not any(name in entry for entry in data for name in ("key", "key_digest", "key_env"))


def test_templates_endpoint_answers_get_and_post_only(make_app):
    """Like every endpoint (README: "Every endpoint answers GET and POST"), for tools that POST forms."""
    client = make_app(TEMPLATES)
    assert client.post("/api/templates", status=200).text == client.get("/api/templates", status=200).text
    for method in ("PUT", "DELETE", "PATCH"):
        response = client.request("/api/templates", method=method, status=405)
        assert response.headers["Content-Type"] == TEXT


#
# Secrets.
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
'''


def test_secrets_are_masked_and_not_kept(make_app):
    client = make_app(SECRETS)
    secret = "hunter2-Xyz"
    token = trigger(client, "deploy", Password=secret)
    # The job and its variables are committed before the token is returned.
    assert query(client, "SELECT template FROM jobs WHERE id = ?", int(token)) == [("deploy",)]
    assert final_status(client, token) == "Succeeded"
    logs = logs_of(client, token)
    assert logs == (
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
    rows = query(client, "SELECT variables || coalesce(secrets, '') FROM jobs")
    assert not any(secret in row for (row,) in rows)


#
# max_concurrent, and jobs keeping the template they were triggered with.
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
'''


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


def test_pending_jobs_keep_their_template_over_a_reload(make_app, tmp_path):
    client = make_app(LIMITED)
    first, second = make_fifo(tmp_path, "first"), make_fifo(tmp_path, "second")
    one = trigger(client, "limited", Fifo=str(first))
    two = trigger(client, "limited", Fifo=str(second))
    wait_for(lambda: status_of(client, one) == "Executing", what="the first limited job to start")
    assert status_of(client, two) == "Pending"
    replace_templates(client, '''
        [limited]
        [limited.variables]
        Fifo = ""
        [[limited.steps]]
        log = "new version $Fifo"
    ''')
    three = trigger(client, "limited", Fifo="third")
    release(first)
    release(second)
    assert final_status(client, one) == "Succeeded" and final_status(client, two) == "Succeeded"
    assert logs_of(client, two) == "INFO: got go\n"
    assert final_status(client, three) == "Succeeded"
    assert logs_of(client, three) == "INFO: new version third\n"


def test_a_full_queue_is_503(make_app, tmp_path):
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


#
# HTTP-level errors.
#


@pytest.mark.parametrize("path", ["/api/", "/api/nope", "/api/jobs", "/api/jobs/", "/api/jobs/trigger/extra",
                                  "/api/job/status"])
def test_unknown_path_is_404(shared, path):
    client = shared
    response = client.get(path, status=404)
    assert response.headers["Content-Type"] == TEXT
    assert response.text.strip()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/api/jobs/trigger", "/api/jobs/status", "/api/jobs/logs"])
def test_wrong_method_is_405(shared, method, path):
    client = shared
    before = job_count(client)
    response = getattr(client, method.lower())(f"{path}?template=open", status=405)
    assert response.headers["Content-Type"] == TEXT
    assert "GET" in response.headers["Allow"] and "POST" in response.headers["Allow"]
    assert job_count(client) == before


def test_body_over_max_body_is_413(make_app):
    client = make_app(VARIABLES, MAX_BODY=100)
    response = client.post("/api/jobs/trigger?template=free", "Extra=" + "x" * 200, content_type=FORM, status=413)
    assert response.headers["Content-Type"] == TEXT
    assert response.text.strip()
    client.post("/api/jobs/trigger?template=free", "Extra=" + "x" * 50, content_type=FORM, status=200)
    assert query(client, "SELECT count(*) FROM jobs") == [(1,)]


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x",
                                          "application/octet-stream"])
def test_unsupported_content_type_is_415(shared, content_type):
    client = shared
    before = job_count(client)
    response = client.post("/api/jobs/trigger?template=open", "template=open", content_type=content_type,
                           status=415)
    assert response.headers["Content-Type"] == TEXT
    assert job_count(client) == before


def test_form_content_type_with_charset_is_accepted(make_app):
    client = make_app(VARIABLES)
    token = client.post("/api/jobs/trigger", "template=vars&Target=t%C3%A9", content_type=FORM + "; charset=utf-8").text
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token).startswith("INFO: log: Target=t\u00e9 ")


@pytest.mark.parametrize("body", [
    '["open"]',
    '"open"',
    '42',
    'null',
    '{"template": "open", "Extra": {"a": 1}}',
    '{"template": "open", "Extra": [1, 2]}',
    '{"template": {"name": "open"}}',
    '{"template": "open", "API_Key": {"k": "v"}}',
    '{"template": "open"',
    '',
])
def test_bad_json_bodies_are_400(shared, body):
    client = shared
    before = job_count(client)
    if not body:  # an empty JSON body is no body at all: the query string decides
        client.post("/api/jobs/trigger?template=open", body, content_type="application/json", status=200)
        return
    response = client.post("/api/jobs/trigger?template=open", body, content_type="application/json", status=400)
    assert response.headers["Content-Type"] == TEXT
    assert job_count(client) == before


@pytest.mark.parametrize("path, body", [
    ("/api/jobs/trigger?template=free&Extra=%FF", None),
    ("/api/jobs/trigger?template=free&Extra=%C3", None),
    ("/api/jobs/trigger?template=free&Extra=%ED%A0%80", None),
    ("/api/jobs/trigger?template=fr%FFee", None),
    ("/api/jobs/trigger?template=free&%FF=x", None),
    ("/api/jobs/trigger?template=free", b"Extra=%FF"),
    ("/api/jobs/trigger?template=free", b"Extra=\xff\xfe"),
    ("/api/jobs/trigger", b"template=free&Extra=caf\xe9"),
    ("/api/jobs/status?token=1", b"key=%FF"),
    ("/api/jobs/logs?token=1&key=%C3%28", None),
])
def test_invalid_utf8_is_400(shared, path, body):
    client = shared
    before = job_count(client)
    if body is None:
        response = client.get(path, status=400)
    else:
        response = client.post(path, body, content_type=FORM, status=400)
    assert response.headers["Content-Type"] == TEXT
    assert "UTF-8" in response.text
    assert job_count(client) == before


def test_a_secret_default_is_not_stored_but_still_used(make_app, tmp_path):
    client = make_app("""
        [t]
        [t.variables]
        Token2 = { default = "s3cr3t-default", secret = true }
        [[t.steps]]
        run = 'echo "using $Token2"; [ "${#Token2}" -eq 14 ]'
    """)
    token = client.get("/api/jobs/trigger", {"template": "t"}).text
    assert final_status(client, token) == "Succeeded"
    assert client.get("/api/jobs/logs", {"token": token}).text == "INFO: using ***\n"
    stored = " ".join(row[0] for row in query(client, "SELECT definition FROM template_versions"))
    stored += " ".join(row[0] for row in query(client, "SELECT variables || coalesce(secrets, '') FROM jobs"))
    assert "s3cr3t-default" not in stored


#
# Regression tests for the fixes of an independent review (one per item).
#

REVIEW = '''
[limited_secret]
max_concurrent = 1
timeout = 30
[limited_secret.variables]
Fifo = { required = true }
Password = { default = "", secret = true }
[[limited_secret.steps]]
run = 'read line < "$Fifo"; echo "got $line"'

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

[chosen]
[chosen.variables]
Pw = { default = "", choices = ["alpha-choice-value", "beta-choice-value"], secret = true }
Colour = { default = "red", choices = ["red", "green"] }
[[chosen.steps]]
log = "chosen"

[strict]
[strict.variables]
Server = { default = "web01", pattern = '[a-z]+[0-9]+' }
Colour = { default = "red", choices = ["red", "green"] }
Note = { default = "", pattern = '[a-z]+' }
[[strict.steps]]
log = "Server=$Server Colour=$Colour Note=$Note"
'''


def test_review_secret_removed_when_a_pending_job_is_canceled(make_app, tmp_path):
    client = make_app(REVIEW)
    first, second = make_fifo(tmp_path, "first"), make_fifo(tmp_path, "second")
    blocking = trigger(client, "limited_secret", Fifo=str(first), Password="first-secret-Q1")
    wait_for(lambda: status_of(client, blocking) == "Executing", what="the blocking job to start")
    pending = trigger(client, "limited_secret", Fifo=str(second), Password="pending-secret-Q2")
    assert status_of(client, pending) == "Pending"
    (stored,) = query(client, "SELECT secrets FROM jobs WHERE id = ?", int(pending))[0]
    assert json.loads(stored)["Password"] == "pending-secret-Q2", "a Pending job keeps its secret until it ends"

    assert call(client, "GET", "/api/jobs/cancel", {"token": pending}).text == "Error"
    assert logs_of(client, pending) == "ERROR: Job canceled\n"
    variables, secrets = query(client, "SELECT variables, secrets FROM jobs WHERE id = ?", int(pending))[0]
    assert (json.loads(variables), secrets) == ({"Fifo": str(second), "Password": None}, None)
    assert not fifo_has_reader(second), "the canceled job never ran"

    release(first)
    assert final_status(client, blocking) == "Succeeded"
    rows = query(client, "SELECT variables || coalesce(secrets, '') FROM jobs")
    assert not any("secret-Q" in row for (row,) in rows), rows


def test_review_multiline_secret_is_masked_on_every_line(make_app):
    client = make_app(REVIEW)
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


def test_review_secret_in_a_program_that_cannot_start_is_masked(make_app):
    client = make_app(REVIEW)
    secret = "top\\secret-XYZ"  # a backslash: a repr() of the path would double it and escape the mask
    token, status, logs = run_job(client, "cannot_start", Pw=secret)
    assert status == "Error", logs
    lines = logs.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), lines
    assert "/nonexistent/***" in lines[0], lines
    assert "secret-XYZ" not in logs and "top\\" not in logs, logs


def test_review_templates_endpoint_hides_a_secrets_choices(make_app):
    client = make_app(REVIEW)
    response = client.get("/api/templates", status=200)
    variables = {v["name"]: v for entry in json.loads(response.text) if entry["name"] == "chosen"
                 for v in entry["variables"]}
    assert variables["Pw"]["choices"] == [] and variables["Pw"]["secret"] is True
    assert variables["Colour"]["choices"] == ["red", "green"], "a plain variable's choices are shown"
    assert "alpha-choice-value" not in response.text and "beta-choice-value" not in response.text


@pytest.mark.parametrize("name, rule", [("Server", "pattern"), ("Colour", "one of"), ("Note", "pattern")])
@pytest.mark.parametrize("method", METHODS)
def test_review_empty_value_must_follow_pattern_and_choices(make_app, method, name, rule):
    client = make_app(REVIEW)
    response = call(client, method, "/api/jobs/trigger", {"template": "strict", name: ""}, status=400)
    assert f"Variable {name}" in response.text and rule in response.text, response.text
    assert query(client, "SELECT count(*) FROM jobs") == [(0,)]
    # Leaving it out keeps the default (an empty default included).
    token, status, logs = run_job(client, "strict")
    assert (status, logs) == ("Succeeded", "INFO: Server=web01 Colour=red Note=\n")


def test_review_empty_default_with_a_pattern_still_loads():
    templates = server_module.load_templates(ROOT / "templates.toml")
    notify = templates["ablast"].variables["sendnotification"]
    assert notify.default == "" and notify.pattern is not None
    assert not notify.pattern.fullmatch("")


HEAD_AND_OPTIONS_PATHS = ["/api/jobs/trigger", "/api/jobs/status", "/api/jobs/logs", "/api/jobs/cancel"]


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
@pytest.mark.parametrize("path", HEAD_AND_OPTIONS_PATHS)
def test_review_head_and_options_are_405(shared, method, path):
    client = shared
    token, _, _ = run_job(client, "open")
    before = job_count(client)
    params = {"template": "open"} if path.endswith("trigger") else {"token": token}
    response = client.request(f"{path}?{urllib.parse.urlencode(params)}", method=method, status=405)
    assert response.headers["Content-Type"] == TEXT
    assert response.headers["Allow"] == "GET, POST"
    assert job_count(client) == before, "HEAD or OPTIONS never triggers a job"


def test_review_head_on_cancel_does_not_cancel(make_app, tmp_path):
    client = make_app(FOLLOW)
    fifo = make_fifo(tmp_path, "gate")
    token = trigger(client, "gated", Fifo=str(fifo))
    wait_for(lambda: logs_of(client, token) == "INFO: waiting\n", what="the gated job to start")
    client.request(f"/api/jobs/cancel?token={token}", method="HEAD", status=405)
    assert status_of(client, token) == "Executing"
    release(fifo)
    assert final_status(client, token) == "Succeeded"


@pytest.mark.parametrize("path, body", [
    ("/api/jobs/trigger?template=vars", '{"Target": "AA", "Target": "BB"}'),
    ("/api/jobs/trigger?template=vars", '{"Target": "AA", "target": "BB"}'),
    ("/api/jobs/trigger?template=locked", '{"API_Key": "s3cret", "API_Key": "s3cret"}'),
    ("/api/jobs/trigger?template=locked", '{"API_Key": "wrong", "api_key": "s3cret"}'),
    ("/api/jobs/trigger", '{"template": "open", "template": "open"}'),
])
def test_review_json_member_given_twice_is_400(shared, path, body):
    client = shared
    before = job_count(client)
    response = client.post(path, body, content_type="application/json", status=400)
    assert response.headers["Content-Type"] == TEXT
    assert "more than once" in response.text, response.text
    assert job_count(client) == before


def test_review_json_member_given_twice_targetserver(make_app):
    client = make_app('''
        [ablast]
        [ablast.variables]
        TargetServer = "ABLSV1"
        [[ablast.steps]]
        log = "$TargetServer"
    ''')
    response = client.post("/api/jobs/trigger?template=ablast", '{"TargetServer":"AA","TargetServer":"BB"}',
                           content_type="application/json", status=400)
    assert "TargetServer" in response.text, response.text
    assert query(client, "SELECT count(*) FROM jobs") == [(0,)]
    token = client.post("/api/jobs/trigger?template=ablast", '{"TargetServer":"AA"}',
                        content_type="application/json", status=200).text
    assert final_status(client, token) == "Succeeded"
    assert logs_of(client, token) == "INFO: AA\n"


@pytest.mark.parametrize("endpoint, name, value", [
    ("/api/jobs/logs", "offset", "1_0"),
    ("/api/jobs/logs", "offset", "+1"),
    ("/api/jobs/logs", "offset", " 1"),
    ("/api/jobs/logs", "offset", "1 "),
    ("/api/jobs/logs", "offset", "\u0663"),  # ARABIC-INDIC DIGIT THREE
    ("/api/jobs/logs", "wait", "1e3"),
    ("/api/jobs/logs", "wait", "nan"),
    ("/api/jobs/logs", "wait", "+1"),
    ("/api/jobs/logs", "wait", "1_0"),
    ("/api/jobs/status", "wait", "1e3"),
    ("/api/jobs/status", "wait", "nan"),
    ("/api/jobs/status", "wait", "\u0663"),
    ("/api/jobs/status", "wait", " 1"),
])
def test_review_strict_offset_and_wait_are_400(shared, endpoint, name, value):
    client = shared
    token, _, _ = run_job(client, "three")
    response = call(client, "GET", endpoint, {"token": token, name: value}, status=400)
    assert f"Parameter {name}" in response.text, response.text


@pytest.mark.parametrize("endpoint, params, body", [
    ("/api/jobs/status", {"wait": "0.5"}, "Succeeded"),
    ("/api/jobs/status", {"wait": "100"}, "Succeeded"),
    ("/api/jobs/logs", {"wait": "0.5"}, "INFO: one\nINFO: two\nINFO: three\n"),
    ("/api/jobs/logs", {"wait": "100", "offset": "1"}, "INFO: two\nINFO: three\n"),
    ("/api/jobs/logs", {"wait": "100", "offset": "3"}, ""),
])
def test_review_plain_numbers_are_accepted(shared, endpoint, params, body):
    client = shared
    token, status, _ = run_job(client, "three")
    assert status == "Succeeded"
    response = call(client, "GET", endpoint, {"token": token, **params})
    assert response.text == body


@pytest.mark.parametrize("path", ["/api", "/api/nope", "/api/jobs/trigger/extra"])
def test_review_404_names_every_endpoint(shared, path):
    response = shared.get(path, status=404)
    for endpoint in ("/api/jobs/trigger", "/api/jobs/status", "/api/jobs/logs", "/api/jobs/cancel",
                     "/api/templates"):
        assert endpoint in response.text, response.text


#
# Regression tests for the fixes of a second independent review (one per item).
#

SECOND_REVIEW = '''
[straddle]
[straddle.variables]
Password = { default = "", secret = true, required = true }
[[straddle.steps]]
# 65,530 bytes, then the secret across the 64 KiB cut: in one write, or its first 8 characters, a pause (the
# reader cuts the line meanwhile) and the rest.
run = """head -c 65530 /dev/zero | tr '\\\\0' a
if [ "$Split" = yes ]; then printf '%.8s' "$Password"; sleep 0.3; printf '%s' "${Password#????????}"
else printf '%s' "$Password"; fi
echo ' end'"""
[straddle.variables.Split]
default = "no"

[longline]
[[longline.steps]]
# One write: the reader most likely gets the end of the line, newline included, in its second read.
exec = ["python3", "-c", "import os; os.write(1, b'b' * 70000 + b'\\\\n')"]

[chosen]
[chosen.variables]
Pw = { default = "", choices = ["alpha-choice-value", "beta-choice-value"], secret = true }
[[chosen.steps]]
run = '[ "${#Pw}" -eq 18 ]'

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

[biglog]
[[biglog.steps]]
log = """{lines}"""
'''.replace("{lines}", "\n".join(f"line {n}" for n in range(6000)))


@pytest.mark.parametrize("split", ["no", "yes"])
def test_review2_a_secret_across_the_64_KiB_cut_is_masked(make_app, split):
    client = make_app(SECOND_REVIEW)
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


def test_review2_a_finished_line_over_64_KiB_is_cut_too(make_app):
    """A line whose end arrives in the same read as its last 64 KiB was stored whole before."""
    client = make_app(SECOND_REVIEW)
    token, status, logs = run_job(client, "longline")
    assert status == "Succeeded"
    sizes = [len(line.removeprefix("INFO: ")) for line in logs.splitlines()]
    assert sizes == [65536, 70000 - 65536], sizes


def test_review2_a_secrets_choices_are_not_stored(make_app):
    client = make_app(SECOND_REVIEW)
    token, status, logs = run_job(client, "chosen", Pw="alpha-choice-value")
    assert status == "Succeeded", logs
    stored = " ".join(row[0] for row in query(client, "SELECT definition FROM template_versions"))
    stored += " ".join(row[0] for row in query(client, "SELECT variables FROM jobs"))
    assert "choice-value" not in stored, stored
    # A stored version still runs a job: the values were checked when it was triggered.
    version = catalog(client).get("chosen").version
    catalog(client)._versions.pop(version)
    assert [step.command for step in catalog(client).version(version).steps] == ['[ "${#Pw}" -eq 18 ]']


def test_review2_a_log_step_ending_in_a_newline_adds_no_empty_entry(make_app):
    client = make_app(SECOND_REVIEW)
    token, status, logs = run_job(client, "trailing")
    assert status == "Succeeded"
    assert logs == "INFO: first\nINFO: second\nINFO: single\nINFO: \n", logs


def test_review2_a_job_with_stored_entries_is_never_pending(make_app):
    """Its entries are flushed every 5,000: it is marked Executing first, so that after a crash it is ended
    rather than run again (a second run collided with the entries of the first and was stuck in Pending)."""
    client = make_app(SECOND_REVIEW)
    token = trigger(client, "biglog")
    seen = []
    while not seen or seen[-1][0] not in FINAL:
        (status, count), = query(client, "SELECT status, (SELECT count(*) FROM logs WHERE job_id = id) "
                                         "FROM jobs WHERE id = ?", int(token))
        seen.append((status, count))
        wait_for(lambda: True, timeout=0.01)
    assert not any(status == "Pending" and count for status, count in seen), seen
    assert final_status(client, token) == "Succeeded"
    assert len(logs_of(client, token).splitlines()) == 6000


@pytest.mark.parametrize("path", ["/api/jobs//trigger", "/api//jobs/trigger", "/api//templates"])
def test_review2_a_doubled_slash_is_a_404_not_a_redirect(shared, path):
    response = shared.get(path, {"template": "three"}, status=404)
    assert response.headers["Content-Type"] == TEXT and "Location" not in response.headers
    assert "/api/jobs/trigger" in response.text


#
# Regression tests for the fixes of a final review of the session's changes.
#


def test_review3_a_pending_job_of_a_stored_version_with_a_long_default_runs_after_an_upgrade(make_app, tmp_path,
                                                                                               database):
    """Defaults over 8 KiB are refused in templates.toml now; a version stored before, with its Pending jobs,
    must still run them (its default is not used: the job's values were resolved when it was triggered)."""
    if database.startswith("postgresql:"):
        pytest.skip("the first schema was SQLite's only")
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.db")) as db:
        db.executescript(FIRST_SCHEMA)
        definition = {"variables": {"Blob": "x" * 9000}, "steps": [{"run": 'echo "len=${#Blob}"'}]}
        db.execute("INSERT INTO template_versions (id, name, definition) VALUES (1, 'big', ?)",
                   (json.dumps(definition),))
        db.execute("INSERT INTO jobs (template_version, template, status, variables, created_at) "
                   "VALUES (1, 'big', 'Pending', ?, 0)", (json.dumps({"Blob": "x" * 9000}),))
        db.commit()
    client = make_app('[big]\n[big.variables]\nBlob = "short"\n[[big.steps]]\nrun = \'echo "len=${#Blob}"\'\n')
    assert final_status(client, "1") == "Succeeded"
    assert logs_of(client, "1") == "INFO: len=9000\n"


def test_review3_the_log_budget_counts_output_as_it_came_not_masked(make_app):
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

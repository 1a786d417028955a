"""The HTTP API in process (WebTest), on both stores: the status codes of trigger, status, logs and cancel, GET
and POST, keys and where they come from, Otter's two examples, variables and their rules, following a log
(offset, wait and the X-Log-Offset / X-Job-Complete headers), /api/templates, malformed requests and bodies.

What a job does once triggered is in test_runner.py; what only a real server shows is in test_server.py."""

import json
import re
import urllib.parse

import pytest

from app import TemplateError
from conftest import (FORM, ROOT, TEXT, adds_no_job, call, final_status, job_count, logs_of, make_fifo,
                      module_app, query, release, run_job, status_of, store_database, trigger, wait_for)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Every test of this file runs on both stores."""
    return store_database(request.param, request, tmp_path)


METHODS = ["GET", "POST"]
ENDPOINTS = ["/api/jobs/trigger", "/api/jobs/status", "/api/jobs/logs", "/api/jobs/cancel"]

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
run = 'echo "run: $JobToken $TemplateName $JobInstance"'
[[builtins.steps]]
exec = ["echo", "exec: ${JobToken}", "$templatename"]

[strict]
[strict.variables]
Server = { default = "web01", pattern = '[a-z]+[0-9]+' }
Colour = { default = "red", choices = ["red", "green"] }
Note = { default = "", pattern = '[a-z]+' }
[[strict.steps]]
log = "Server=$Server Colour=$Colour Note=$Note"

[pin]
[pin.variables]
Pin = { default = "0000", secret = true, pattern = '[0-9]{4}' }
Level = { default = "low", secret = true, choices = ["low", "high-and-hidden"] }
[[pin.steps]]
log = "ok"
'''

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

[keyed]
key = "k3y"
timeout = 30
[keyed.variables]
Fifo = { required = true }
[[keyed.steps]]
log = "waiting"
[[keyed.steps]]
run = 'read line < "$Fifo"; echo "got $line"'
'''


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared(request, tmp_path_factory):
    """One app per store for the tests that leave nothing behind for the others: the tables of refused
    requests (each asserts that it added no job) and jobs that only their own test reads, by token. Its wrong
    keys, all from one address, add up over the module: the throttle of wrong keys is lifted for it."""
    with module_app(request, tmp_path_factory, TEMPLATES + VARIABLES + FOLLOW, request.param,
                    KEY_FAILURES=1_000_000) as client:
        yield client


@pytest.fixture(scope="module")
def three(shared):
    """The token of a finished job of the shared app that logged one, two and three."""
    token, status, _ = run_job(shared, "three")
    assert status == "Succeeded"
    return token


#
# Status codes of trigger, status and logs, GET and POST.
#


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
    before = job_count(shared)
    response = call(shared, method, "/api/jobs/trigger", params, status=expected)
    if expected == 200:
        assert re.fullmatch(r"[1-9][0-9]*", response.text)
        assert query(shared, "SELECT template FROM jobs WHERE id = ?", int(response.text)) == \
            [(params["template"].lower(),)]
        assert job_count(shared) == before + 1
    else:
        assert response.text.strip(), "an error response carries a reason"
        assert job_count(shared) == before


def test_trigger_error_reasons(shared):
    assert "template" in trigger(shared, "", status=400).lower()
    assert "nope" in trigger(shared, "nope", status=404)
    assert "key" in trigger(shared, "locked", status=403).lower()
    assert "key" in trigger(shared, "locked", key="wrong", status=403).lower()
    assert "hidden" in trigger(shared, "hidden", status=403)


@pytest.mark.parametrize("endpoint", ["/api/jobs/status", "/api/jobs/logs"])
@pytest.mark.parametrize("method", METHODS)
def test_status_and_logs_status_codes(shared, endpoint, method):
    open_token = trigger(shared, "open")
    locked_token = trigger(shared, "locked", key="s3cret")
    final_status(shared, open_token)
    final_status(shared, locked_token, key="s3cret")
    ok = {
        "status": {open_token: "Succeeded", locked_token: "Succeeded"},
        "logs": {open_token: "INFO: open job\n", locked_token: "INFO: locked job\n"},
    }[endpoint.rsplit("/", 1)[1]]

    def check(params, expected):
        response = call(shared, method, endpoint, params, status=expected)
        if expected == 200:
            assert response.text == ok[params["token"]]
        else:
            assert response.text.strip()

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


@pytest.mark.parametrize("source", ["query", "form", "header", "json", "json-query"])
def test_each_key_source(shared, source):
    response = send_key(shared, "/api/jobs/trigger", {"template": "locked"}, "s3cret", source, 200)
    token = response.text
    assert re.fullmatch(r"[0-9]+", token)
    assert response.headers["Content-Type"] == TEXT
    send_key(shared, "/api/jobs/trigger", {"template": "locked"}, "wrong", source, 403)
    send_key(shared, "/api/jobs/trigger", {"template": "locked"}, "other-key", source, 403)
    final_status(shared, token, key="s3cret")
    assert send_key(shared, "/api/jobs/status", {"token": token}, "s3cret", source, 200).text == "Succeeded"
    assert send_key(shared, "/api/jobs/logs", {"token": token}, "s3cret", source, 200).text == "INFO: locked job\n"
    for path in ("/api/jobs/status", "/api/jobs/logs"):
        send_key(shared, path, {"token": token}, "wrong", source, 403)
        send_key(shared, path, {"token": token}, "other-key", source, 403)


def test_empty_header_key_is_missing(shared):
    shared.get("/api/jobs/trigger", {"template": "locked"}, headers={"X-ApiKey": ""}, status=403)
    shared.get("/api/jobs/trigger", {"template": "open"}, headers={"X-ApiKey": ""}, status=200)


def test_key_is_compared_per_template(shared):
    locked = trigger(shared, "locked", key="s3cret")
    other = trigger(shared, "other", key="other-key")
    trigger(shared, "locked", key="other-key", status=403)
    trigger(shared, "other", key="s3cret", status=403)
    assert final_status(shared, locked, key="s3cret") == "Succeeded"
    assert final_status(shared, other, key="other-key") == "Succeeded"
    call(shared, "GET", "/api/jobs/status", {"token": locked, "key": "other-key"}, status=403)
    call(shared, "GET", "/api/jobs/logs", {"token": other, "key": "s3cret"}, status=403)


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


def replace_templates(client, text):
    """Write a new templates file and load it at once."""
    catalog = client.app.extensions["jobserver"].catalog
    catalog.path.write_text(text)
    catalog.reload()


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
    with pytest.raises(TemplateError):
        replace_templates(client, '[rotated]\nkey = "bad"\n[[rotated.steps]]\nlog = "$Undeclared"\n')
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
# Variables: what a request may give, and the rules a value must follow.
#


def expected_vars_log(target, count, color):
    return (f"INFO: log: Target={target} Count={count} Color={color}\n"
            f"INFO: run: Target={target} Count={count} Color={color}\n"
            f"INFO: exec: Target={target} Count={count}\n")


@pytest.mark.parametrize("template, expected", [
    ("vars", expected_vars_log("default-target", "1", "red")),
    ("strict", "INFO: Server=web01 Colour=red Note=\n"),  # an empty default with a pattern included
])
def test_defaults_when_nothing_is_given(shared, template, expected):
    _, status, logs = run_job(shared, template)
    assert (status, logs) == ("Succeeded", expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("names", [
    ("Target", "Count", "Color"),
    ("target", "COUNT", "cOlOr"),
    ("$Target", "$count", "$COLOR"),
])
def test_variables_override_defaults(shared, method, names):
    params = {"template": "vars", names[0]: "web-01", names[1]: "42", names[2]: "green"}
    token = call(shared, method, "/api/jobs/trigger", params).text
    assert final_status(shared, token) == "Succeeded"
    assert logs_of(shared, token) == expected_vars_log("web-01", "42", "green")


def test_variables_from_query_and_body_together(shared):
    token = shared.post("/api/jobs/trigger?template=vars&Target=from-query", "Count=7", content_type=FORM).text
    assert final_status(shared, token) == "Succeeded"
    assert logs_of(shared, token) == expected_vars_log("from-query", "7", "red")


def test_variables_from_a_json_body(shared):
    token = shared.post_json("/api/jobs/trigger", {"template": "vars", "Target": "json-target", "Count": 12}).text
    assert final_status(shared, token) == "Succeeded"
    assert logs_of(shared, token) == expected_vars_log("json-target", "12", "red")
    token = shared.post_json("/api/jobs/trigger?template=vars", {"Target": "AA"}).text  # the template in the query
    assert final_status(shared, token) == "Succeeded"
    assert logs_of(shared, token) == expected_vars_log("AA", "1", "red")


def test_form_content_type_with_charset_is_accepted(shared):
    token = shared.post("/api/jobs/trigger", "template=vars&Target=t%C3%A9", content_type=FORM + "; charset=utf-8").text
    assert final_status(shared, token) == "Succeeded"
    assert logs_of(shared, token).startswith("INFO: log: Target=t\u00e9 ")


def test_builtin_variables(shared):
    token, status, logs = run_job(shared, "builtins")
    assert status == "Succeeded"
    instance = shared.app.extensions["jobserver"].runner.instance
    assert logs == (f"INFO: log: {token} builtins\nINFO: run: {token} builtins {instance}\n"
                    f"INFO: exec: {token} builtins\n")


@pytest.mark.parametrize("variables, expected", [
    ({"Extra": "hello"}, "INFO: Extra=hello extra=unset\n"),  # an undeclared variable, as allowed
    ({"V" * 50: "x", "_under": "y", "Extra": "z" * 8192}, f"INFO: Extra={'z' * 8192} extra=unset\n"),  # limits
    ({f"V{number}": str(number) for number in range(100)}, "INFO: Extra=unset extra=unset\n"),  # 100 of them
])
def test_new_variables_accepted_when_allowed(shared, variables, expected):
    _, status, logs = run_job(shared, "free", **variables)
    assert (status, logs) == ("Succeeded", expected)


# (template, request parameters after template=..., words the 400 body must contain)
INVALID_VARIABLES = [
    ("vars", [("Count", "12a")], ["Count", "pattern"]),
    ("vars", [("Count", "a12")], ["Count", "pattern"]),
    ("vars", [("Count", "1\n")], ["Count", "pattern"]),
    ("vars", [("Count", "-5")], ["Count", "pattern"]),
    ("vars", [("Color", "blue")], ["Color", "green"]),
    ("vars", [("Color", "RED")], ["Color", "green"]),
    ("vars", [("Color", "red ")], ["Color", "green"]),
    # An empty value must follow the pattern and the choices too (leaving the variable out keeps its default).
    ("strict", [("Server", "")], ["Variable Server", "pattern"]),
    ("strict", [("Colour", "")], ["Variable Colour", "one of"]),
    ("strict", [("Note", "")], ["Variable Note", "pattern"]),
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
    ("free", [("token", "5")], ["token"]),  # one of the API's parameter names, a variable nowhere
]


@pytest.mark.parametrize("template, params, words", INVALID_VARIABLES,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(INVALID_VARIABLES)])
@pytest.mark.parametrize("method", METHODS)
def test_invalid_variables_are_400(shared, method, template, params, words):
    with adds_no_job(shared):
        response = call(shared, method, "/api/jobs/trigger", [("template", template), *params], status=400)
    for word in words:
        assert word in response.text, f"{word!r} not in {response.text!r}"


def test_duplicate_between_query_and_body(shared):
    with adds_no_job(shared):
        response = shared.post("/api/jobs/trigger?template=vars&Target=a", "target=b", content_type=FORM, status=400)
        assert "arget" in response.text
        response = shared.post("/api/jobs/trigger?template=vars&Target=a", "Target=a", content_type=FORM, status=400)
        assert "Target" in response.text
        response = shared.post("/api/jobs/trigger?template=vars", "template=vars", content_type=FORM, status=400)
        assert "template" in response.text
        shared.post_json("/api/jobs/trigger?template=vars&Count=1", {"count": "2"}, status=400)


# Names that change how programs run, refused from a request even where the template allows new variables.
RESERVED_NAMES = [
    "PATH", "path", "Path", "$PATH", "HOME", "$home", "SHELL", "USER", "user", "IFS", "ENV", "BASH_ENV", "CDPATH",
    "PS4", "SHELLOPTS", "BASHOPTS", "TMPDIR", "tmpdir",
    "LD_PRELOAD", "ld_preload", "$ld_preload", "ld_library_path", "LD_x", "LD_AUDIT", "DYLD_INSERT_LIBRARIES",
    "BASH_FUNC_x", "bash_x", "PYTHONPATH", "PYTHONSTARTUP", "PythonStartup", "pythonhome", "PYTHONx", "PERL5LIB",
    "PERL5OPT", "PERLLIB", "PERLx", "RUBYOPT", "rubylib", "NODE_OPTIONS", "node_x", "GIT_SSH", "GIT_SSH_COMMAND",
    "git_dir", "SSH_AUTH_SOCK", "LC_ALL", "lc_ctype", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "X_PROXY",
    "no_Proxy", "All_Proxy", "$template", "$Template", "$key", "$KEY", "$token", "token", "Token",
    # Beyond the list, documented in the README: names through which glibc loads code or files.
    "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "MALLOC_CHECK_",
    "GETCONF_DIR", "LOCALDOMAIN", "NIS_PATH", "RES_OPTIONS", "TZDIR", "TZ", "tz", "LANG", "LANGUAGE",
]


@pytest.mark.parametrize("name", RESERVED_NAMES)
def test_reserved_names_are_refused_even_with_allow_new_variables(shared, name):
    # `free` accepts any new variable, so the refusal can only come from the name itself.
    with adds_no_job(shared):
        for source, send in [
            ("query", lambda: shared.get("/api/jobs/trigger", [("template", "free"), (name, "/tmp/evil")],
                                         expect_errors=True)),
            ("form", lambda: shared.post("/api/jobs/trigger", [("template", "free"), (name, "/tmp/evil")],
                                         expect_errors=True)),
            ("json", lambda: shared.post_json("/api/jobs/trigger", {"template": "free", name: "/tmp/evil"},
                                              expect_errors=True)),
            ("declared", lambda: shared.post("/api/jobs/trigger", [("template", "vars"), (name, "/tmp/evil")],
                                             expect_errors=True)),
        ]:
            response = send()
            assert response.status_int == 400, f"{name} from the {source}: {response.status} {response.text!r}"
            assert response.headers["Content-Type"] == TEXT
            text = response.text
            assert len(text) <= 300 and "\n" not in text and "Traceback" not in text, text
            assert re.search("variable|parameter", text, re.I), (source, text)
            assert name.removeprefix("$") in text, (source, text)
            if source in ("query", "form") and name.lower() != "$template":  # else: template given twice
                assert "reserved" in text, (source, text)


def test_secret_values_never_appear_in_error_responses(shared):
    with adds_no_job(shared):
        response = trigger(shared, "pin", Pin="leak-me-1", status=400)
        assert "Pin" in response and "leak-me-1" not in response
        response = trigger(shared, "pin", Level="leak-me-2", status=400)
        assert "Level" in response and "leak-me-2" not in response and "high-and-hidden" not in response


#
# Logs: offset, wait, and the X-Log-Offset / X-Job-Complete headers.
#

ALL_THREE = "INFO: one\nINFO: two\nINFO: three\n"


# (endpoint, parameters, body, X-Log-Offset) for the finished job of three entries; numbers are plain decimals.
@pytest.mark.parametrize("endpoint, params, body, offset", [
    ("/api/jobs/logs", {}, ALL_THREE, "3"),
    ("/api/jobs/logs", {"offset": "0"}, ALL_THREE, "3"),
    ("/api/jobs/logs", {"offset": "1"}, "INFO: two\nINFO: three\n", "3"),
    ("/api/jobs/logs", {"offset": "2"}, "INFO: three\n", "3"),
    ("/api/jobs/logs", {"offset": "3"}, "", "3"),
    ("/api/jobs/logs", {"offset": "10"}, "", None),
    ("/api/jobs/logs", {"offset": "2", "wait": "5"}, "INFO: three\n", "3"),
    ("/api/jobs/logs", {"offset": "3", "wait": "5"}, "", "3"),
    ("/api/jobs/logs", {"wait": "0.5"}, ALL_THREE, "3"),
    ("/api/jobs/logs", {"wait": "100", "offset": "1"}, "INFO: two\nINFO: three\n", "3"),
    ("/api/jobs/logs", {"wait": "100", "offset": "3"}, "", "3"),
    ("/api/jobs/status", {"wait": "0.5"}, "Succeeded", None),
    ("/api/jobs/status", {"wait": "100"}, "Succeeded", None),
])
@pytest.mark.parametrize("method", METHODS)
def test_offsets_and_waits_accepted(shared, three, method, endpoint, params, body, offset):
    response = call(shared, method, endpoint, {"token": three, **params})
    assert response.text == body
    if endpoint.endswith("logs"):
        assert response.headers["X-Job-Complete"] == "true"
        assert "X-Log-Offset" in response.headers
        assert offset is None or response.headers["X-Log-Offset"] == offset


@pytest.mark.parametrize("endpoint, name, value", [
    ("/api/jobs/logs", "offset", "-1"),
    ("/api/jobs/logs", "offset", "x"),
    ("/api/jobs/logs", "offset", "1.5"),
    ("/api/jobs/logs", "offset", "1e3"),
    ("/api/jobs/logs", "offset", "inf"),
    ("/api/jobs/logs", "offset", "1_0"),
    ("/api/jobs/logs", "offset", "+1"),
    ("/api/jobs/logs", "offset", " 1"),
    ("/api/jobs/logs", "offset", "1 "),
    ("/api/jobs/logs", "offset", "\u0663"),  # ARABIC-INDIC DIGIT THREE
    ("/api/jobs/logs", "wait", "-1"),
    ("/api/jobs/logs", "wait", "soon"),
    ("/api/jobs/logs", "wait", "nan"),
    ("/api/jobs/logs", "wait", "inf"),
    ("/api/jobs/logs", "wait", "1e3"),
    ("/api/jobs/logs", "wait", "+1"),
    ("/api/jobs/logs", "wait", "1_0"),
    ("/api/jobs/status", "wait", "-0.5"),
    ("/api/jobs/status", "wait", "x"),
    ("/api/jobs/status", "wait", "nan"),
    ("/api/jobs/status", "wait", "1e3"),
    ("/api/jobs/status", "wait", "\u0663"),
    ("/api/jobs/status", "wait", " 1"),
])
def test_bad_offset_or_wait_is_400(shared, three, endpoint, name, value):
    response = call(shared, "GET", endpoint, {"token": three, name: value}, status=400)
    assert response.text == {"offset": "Parameter offset must be a whole number, 0 or more",
                             "wait": "Parameter wait must be a number of seconds, 0 or more"}[name]


def test_logs_of_a_running_job(shared, tmp_path):
    fifo = make_fifo(tmp_path, "gate")
    token = trigger(shared, "gated", Fifo=str(fifo))

    def first_entry():
        response = call(shared, "GET", "/api/jobs/logs", {"token": token})
        return response if response.text else None

    response = wait_for(first_entry, what="the first log entry of a running job")
    assert response.text == "INFO: waiting\n"
    assert response.headers["X-Log-Offset"] == "1"
    assert response.headers["X-Job-Complete"] == "false"
    assert status_of(shared, token) == "Executing"
    response = call(shared, "GET", "/api/jobs/logs", {"token": token, "offset": "1"})
    assert (response.text, response.headers["X-Log-Offset"], response.headers["X-Job-Complete"]) == ("", "1", "false")

    release(fifo)
    assert final_status(shared, token) == "Succeeded"
    response = call(shared, "GET", "/api/jobs/logs", {"token": token, "offset": "1"})
    assert response.text == "INFO: got go\n"
    assert response.headers["X-Log-Offset"] == "2"
    assert response.headers["X-Job-Complete"] == "true"


def test_a_job_running_here_is_answered_without_a_read_and_its_key_still_checked(shared, tmp_path, monkeypatch):
    """The instance running a job knows its status, entries and key (JobRunner.running_job): a client that
    triggers and waits costs one read less. Once the job ends, the store answers again."""
    fifo = make_fifo(tmp_path, "gate")
    token = trigger(shared, "keyed", key="k3y", Fifo=str(fifo))
    wait_for(lambda: logs_of(shared, token, key="k3y") == "INFO: waiting\n", what="the keyed job to start")
    store, reads = shared.app.extensions["jobserver"].store, []
    read = store.get_job
    monkeypatch.setattr(store, "get_job", lambda job_id: reads.append(job_id) or read(job_id))
    assert status_of(shared, token, key="k3y") == "Executing"
    response = call(shared, "GET", "/api/jobs/logs", {"token": token, "key": "k3y"})
    assert (response.text, response.headers["X-Log-Offset"], response.headers["X-Job-Complete"]) == (
        "INFO: waiting\n", "1", "false")
    for key in ("wrong", "", None, "K3Y"):
        call(shared, "GET", "/api/jobs/status", {"token": token, "key": key}, status=403)
    assert reads == [], "a job running here needs no read"

    release(fifo)
    assert final_status(shared, token, key="k3y") == "Succeeded"
    assert status_of(shared, token, key="k3y") == "Succeeded"
    assert reads, "the store says what an ended job is"
    response = call(shared, "GET", "/api/jobs/logs", {"token": token, "key": "k3y", "offset": "1"})
    assert (response.text, response.headers["X-Log-Offset"], response.headers["X-Job-Complete"]) == (
        "INFO: got go\n", "2", "true")


#
# Cancel (what needs a job's processes is in test_server.py and test_runner.py).
#


def test_head_on_cancel_does_not_cancel(shared, tmp_path):
    fifo = make_fifo(tmp_path, "gate")
    token = trigger(shared, "gated", Fifo=str(fifo))
    wait_for(lambda: logs_of(shared, token) == "INFO: waiting\n", what="the gated job to start")
    shared.request(f"/api/jobs/cancel?token={token}", method="HEAD", status=405)
    assert status_of(shared, token) == "Executing"
    release(fifo)
    assert final_status(shared, token) == "Succeeded"


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
        Pw = { default = "", choices = ["alpha-choice-value", "beta-choice-value"], secret = true }
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
    assert set(variables) == {"Target", "Count", "Color", "Password", "Pw"}
    assert variables["Target"]["default"] == "web-01" and variables["Target"]["required"] is False
    assert variables["Count"]["pattern"] == "[0-9]+" and variables["Count"]["required"] is True
    assert variables["Color"]["choices"] == ["red", "green"], "a plain variable's choices are shown"
    assert variables["Pw"]["choices"] == [] and variables["Pw"]["secret"] is True, "a secret's are not"
    for secret in ("s3cret", "other-key", "described-key", "default-secret-value", "alpha-choice-value",
                   "beta-choice-value"):
        assert secret not in response.text
    assert "Not for the API" not in response.text
    assert not any(name in entry for entry in data for name in ("key", "key_digest", "key_env"))


def test_templates_endpoint_answers_get_and_post_only(shared):
    """Like every endpoint (README: "Every endpoint answers GET and POST"), for tools that POST forms."""
    assert shared.post("/api/templates", status=200).text == shared.get("/api/templates", status=200).text
    for method in ("PUT", "DELETE", "PATCH"):
        response = shared.request("/api/templates", method=method, status=405)
        assert response.headers["Content-Type"] == TEXT


#
# HTTP-level errors: unknown paths, other methods, bodies too large.
#

NOT_FOUND = ("Not found: the endpoints are /api/jobs/trigger, /api/jobs/status, /api/jobs/logs, /api/jobs/cancel"
             " and /api/templates")


@pytest.mark.parametrize("path", ["/api", "/api/", "/api/nope", "/api/jobs", "/api/jobs/", "/api/jobs/trigger/extra",
                                  "/api/job/status", "/api/jobs//trigger", "/api//jobs/trigger", "/api//templates"])
def test_unknown_path_is_404_naming_every_endpoint(shared, path):
    response = shared.get(path, {"template": "three"}, status=404)
    assert response.headers["Content-Type"] == TEXT
    assert "Location" not in response.headers, "a doubled slash is a 404, not a redirect"
    assert response.text == NOT_FOUND


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_other_methods_are_405(shared, three, method, path):
    params = {"template": "open"} if path.endswith("trigger") else {"token": three}
    with adds_no_job(shared):
        response = shared.request(f"{path}?{urllib.parse.urlencode(params)}", method=method, status=405)
    assert response.headers["Content-Type"] == TEXT
    assert response.headers["Allow"] == "GET, POST"
    assert response.text == ("" if method == "HEAD" else f"Method {method} is not allowed here: use GET or POST")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_the_templates_listing_takes_get_and_post_only_like_the_job_endpoints(shared, method):
    response = shared.request("/api/templates", method=method, status=405)
    assert (response.headers["Content-Type"], response.headers["Allow"]) == (TEXT, "GET, POST")
    assert response.text == f"Method {method} is not allowed here: use GET or POST"


def test_body_over_max_body_is_413(make_app):
    client = make_app(VARIABLES, MAX_BODY=100)
    response = client.post("/api/jobs/trigger?template=free", "Extra=" + "x" * 200, content_type=FORM, status=413)
    assert response.headers["Content-Type"] == TEXT
    assert response.text == "The request body is larger than 100 bytes"
    client.post("/api/jobs/trigger?template=free", "Extra=" + "x" * 50, content_type=FORM, status=200)
    assert job_count(client) == 1


#
# Malformed requests: query strings and bodies that are refused, each with its exact reason, adding no job.
#

TWICE = "Parameter '{}' is given more than once"


@pytest.mark.parametrize("path, reason", [
    ("/api/jobs/trigger?template=free&Extra=%FF", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=free&Extra=%C3", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=free&Extra=%ED%A0%80", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=free&Extra=%ff%fe", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=fr%FFee", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=free&%FF=x", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=free&%c3=1", "The query string is not valid UTF-8"),
    ("/api/jobs/logs?token=1&key=%C3%28", "The query string is not valid UTF-8"),
    ("/api/jobs/trigger?template=free&A=a%00b", "Parameter 'A' contains a NUL character"),
    ("/api/jobs/trigger?template=free&A=" + "a" * 100_000, "Parameter 'A' is longer than 8 KiB"),
    ("/api/jobs/trigger?template=free&A=1&A=2", TWICE.format("A")),
    ("/api/jobs/trigger?template=free&Abc=1&aBC=2", TWICE.format("aBC")),
    ("/api/jobs/trigger?template=free&template=free", TWICE.format("template")),
    ("/api/jobs/trigger?template=free&TEMPLATE=free", TWICE.format("TEMPLATE")),
])
@pytest.mark.parametrize("method", METHODS)
def test_malformed_query_strings_are_400(shared, method, path, reason):
    with adds_no_job(shared):
        response = shared.request(path, method=method, expect_errors=True)
    assert (response.status_int, response.text) == (400, reason)
    assert response.headers["Content-Type"] == TEXT


JSON = "application/json"
MEMBER = "JSON member '{}' must be a string, number or boolean"

# (template in the query string, JSON body, reason of the 400)
JSON_REFUSALS = [
    # Not an object of plain members.
    ("open", b'["open"]', "A JSON request body must be an object"),
    ("open", b'"open"', "A JSON request body must be an object"),
    ("open", b"42", "A JSON request body must be an object"),
    ("open", b"null", "A JSON request body must be an object"),
    ("open", b"{", "The request body is not valid JSON"),
    ("open", b'{"template": "open"', "The request body is not valid JSON"),
    ("open", b"\xff\xfe\xfd", "The request body is not valid JSON"),
    (None, b'{"template": "free", "A": {"b": 1}}', MEMBER.format("A")),
    (None, b'{"template": "free", "A": [1]}', MEMBER.format("A")),
    (None, b'{"template": "free", "A": null}', MEMBER.format("A")),
    ("open", b'{"template": {"name": "open"}}', MEMBER.format("template")),
    ("open", b'{"template": "open", "API_Key": {"k": "v"}}', MEMBER.format("API_Key")),
    (None, b'{"template": "free", "A": "\\u0000"}', "Parameter 'A' contains a NUL character"),
    (None, b'{"template": "free", "A": "\\ud800"}', "Parameter 'A' is not valid UTF-8 text"),
    # A member given twice (also differing in case) is a parameter given twice, never the last one winning.
    ("vars", b'{"Target": "AA", "Target": "BB"}', TWICE.format("Target")),
    ("vars", b'{"Target": "AA", "target": "BB"}', TWICE.format("target")),
    ("free", b'{"TargetServer":"AA","TargetServer":"BB"}', TWICE.format("TargetServer")),
    ("locked", b'{"API_Key": "s3cret", "API_Key": "s3cret"}', "JSON member API_Key is given more than once"),
    ("locked", b'{"API_Key": "wrong", "api_key": "s3cret"}', "JSON member API_Key is given more than once"),
    (None, b'{"template": "open", "template": "open"}', TWICE.format("template")),
]

# (path, form body, reason of the 400)
FORM_REFUSALS = [
    ("/api/jobs/trigger?template=free", b"Extra=%FF", "The request body is not valid UTF-8"),
    ("/api/jobs/trigger?template=free", b"Extra=\xff\xfe", "The request body is not valid UTF-8"),
    ("/api/jobs/trigger", b"template=free&Extra=caf\xe9", "The request body is not valid UTF-8"),
    ("/api/jobs/status?token=1", b"key=%FF", "The request body is not valid UTF-8"),
    ("/api/jobs/trigger", b"template=free&A=%00", "Parameter 'A' contains a NUL character"),
    ("/api/jobs/trigger", b"template=free&A=1&a=2", TWICE.format("a")),
    ("/api/jobs/trigger", b"template=free&A=1&$a=2", TWICE.format("$a")),
]

# Neither form-encoded nor JSON: 415.
OTHER_TYPES = ["text/plain", "application/xml", "multipart/form-data; boundary=x", "application/octet-stream"]
UNSUPPORTED = "Unsupported Content-Type '{}': send application/x-www-form-urlencoded or application/json"


@pytest.mark.parametrize("path, body, content_type, status, reason", [
    *[("/api/jobs/trigger" + (f"?template={template}" if template else ""), body, JSON, 400, reason)
      for template, body, reason in JSON_REFUSALS],
    *[(path, body, FORM, 400, reason) for path, body, reason in FORM_REFUSALS],
    *[("/api/jobs/trigger?template=open", b"template=open", content_type, 415,
       UNSUPPORTED.format(content_type.split(";")[0])) for content_type in OTHER_TYPES],
])
def test_malformed_bodies_are_refused(shared, path, body, content_type, status, reason):
    with adds_no_job(shared):
        response = shared.post(path, body, content_type=content_type, expect_errors=True)
    assert (response.status_int, response.text) == (status, reason)
    assert response.headers["Content-Type"] == TEXT


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 2000 + b"]" * 2000],
                         ids=["arrays-100k-deep", "objects-100k-deep", "arrays-2k-deep"])
def test_deeply_nested_json_body_is_400(shared, endpoint, body):
    with adds_no_job(shared):
        response = shared.post(endpoint + "?template=free&token=1", body, content_type=JSON, expect_errors=True)
    assert (response.status_int, response.text) == (400, "The request body is JSON nested too deeply to be a list"
                                                         " of parameters")


def test_an_empty_json_body_is_no_body(shared):
    """The query string decides."""
    token = shared.post("/api/jobs/trigger?template=open", b"", content_type=JSON, status=200).text
    assert final_status(shared, token) == "Succeeded"

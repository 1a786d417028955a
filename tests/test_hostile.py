"""Hostile input (issue 3), end to end in process:

- A hypothesis property test throws random parameter names, values, bodies and content types at every endpoint:
  never a 5xx, every 4xx a short plain-text reason, malformed input always refused, well-formed logs, and no
  command runs that a template did not ask for.
- A job's output cannot forge log entries, whatever bytes it prints.
- Command-injection payloads passed as variables to `run` and `exec` steps execute nothing and arrive byte for byte.

The fixed tables of malformed requests and reserved names are in test_api.py; how output is cut and masked is
in test_runner.py.
"""

import dataclasses
import json
import re
import sys
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import STATUS_WORDS, TEXT, assert_well_formed_log, final_status, logs_of, module_app

ENDPOINTS = ("/api/jobs/trigger", "/api/jobs/status", "/api/jobs/logs", "/api/jobs/cancel")
# A 4xx reason must say what was wrong: it names at least one of these things.
REASON_WORDS = ("parameter", "variable", "token", "template", "json", "utf-8", "content-type", "key", "nul",
                "kib", "body", "query", "method")


def injection_payloads(marker: str) -> list[str]:
    """Shell and argv injection attempts; each would create `marker` (or a file in the step's cwd) if it ran."""
    m = marker
    return [
        f"$(touch {m})", f"`touch {m}`", f"; touch {m}", f";touch {m};", f"| touch {m}", f"|touch {m}",
        f"&& touch {m}", f"|| touch {m}", f"& touch {m} &", f"\ntouch {m}", f"x\ntouch {m}\n", f"x;\n touch {m}",
        f"--output={m}", f"-o {m}", "--help", "--version", "-n", "-e \\n", "-", "--",
        f"'; touch {m}; '", f'"; touch {m}; "', f"'$(touch {m})'", f'"$(touch {m})"', f'\\"; touch {m}; \\"',
        "\\", f"\\$(touch {m})", f"\\`touch {m}\\`", "'", '"', "`", "''", '""', "'\"'\"'",
        f"${{IFS}}touch${{IFS}}{m}", "$IFS", "${PATH}", "$HOME", "$0", "$1", "$@", "$*", "$#", "$?", "$$", "$!", "$-",
        "*", "/*", "?", "[a-z]*", ".*", "~", "~root", "{a,b}", f"{{touch,{m}}}",
        "$((1+1))", f"$((`touch {m}`))", f"$(( $(touch {m}) ))", "$[1+1]",
        f"> {m}", f">> {m}", f"2> {m}", "< /etc/passwd", f"<(touch {m})", f">(touch {m})", f"&>{m}", f">|{m}",
        f"<<EOF\ntouch {m}\nEOF",
        "$Var", "${Var}", "$Payload", "${Payload}", "$JobToken", "${TemplateName}", "$$Var", "$${Var}",
        f"${{Var:-$(touch {m})}}", "${Var:=x}", f"$(<{m})",
        "%s%n%x%d", "%%", "%b", "\\n\\t\\x41\\101", "\t tab and  spaces ", "  leading", "trailing  ", "",
        "é ünïcødé ✓ 日本", f"touch {m}", f"sh -c 'touch {m}'", f"eval touch {m}", f"exec touch {m}",
        f"$(printf x > {m})", "!!", "# comment", f"a=b touch {m}", m,
        "$(touch pwned)", "`touch pwned`", "; touch pwned", "> pwned", "$(mkdir pwned-dir)", "x" * 8192,
    ]


def output_lines(text: str) -> list[str]:
    """The log entries a process printing `text` produces: one per line, a last line without \\n included."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def assert_reason(response):
    """A 4xx: non-empty short plain text that says what was wrong, no traceback."""
    assert response.headers["Content-Type"] == TEXT, response.headers
    text = response.body.decode("utf-8")
    assert text.strip(), f"empty {response.status} body"
    assert len(text) <= 300, f"{response.status} body too long: {text[:300]!r}"
    assert "\n" not in text.strip() and "Traceback" not in text, text[:300]
    assert any(word in text.lower() for word in REASON_WORDS), f"{response.status} does not say what: {text!r}"


#
# Property-based: random parameters at every endpoint.
#

FUZZ_TEMPLATES = """
[fuzz]
allow_new_variables = true

[fuzz.variables]
Payload = { default = "", pattern = '(?s).*' }
Choice = { default = "a", choices = ["a", "b"] }
Digits = { default = "1", pattern = '[0-9]+' }

[[fuzz.steps]]
log = "payload $Payload"

[[fuzz.steps]]
run = 'printf "run[%s]\\n" "$Payload"; env'
cwd = "CWD"

[[fuzz.steps]]
exec = ["printf", 'exec[%s]\\n', "$Payload", "${Choice}", "$Digits"]
cwd = "CWD"

[keyed]
key = "s3cret"

[[keyed.steps]]
log = "keyed"

# Can never run through the API: if MARKER appears, a command ran that nobody may ask for.
[noapi]
api = false

[[noapi.steps]]
run = 'touch "MARKER"'
"""

INTERESTING_NAMES = [
    "Payload", "payload", "PAYLOAD", "$Payload", "$$Payload", "$payload", "Choice", "CHOICE", "Digits", "digits",
    "template", "Template", "TEMPLATE", "$template", "key", "Key", "KEY", "$key", "token", "Token", "$token",
    "API_Key", "api_key", "offset", "Offset", "wait", "WAIT", "PATH", "Path", "LD_PRELOAD", "BASH_ENV", "IFS",
    "JobToken", "jobtoken", "TemplateName", "NewVar", "newvar", "", "$", "$$", "1abc", "a" * 50, "a" * 51, "a b",
    "a-b", "é", "A\x00", "\x00", ";", "a=b", "&", "%", "+", "x[]", "x.y", "_", "__proto__", "constructor",
]
SAFE_WAITS = [b"0", b"0.01", b"-1", b"nan", b"inf", b"-inf", b"1e999", b"abc", b"", b" 0", b"0x1", b"\xff"]
TEMPLATE_VALUES = ["fuzz", "FUZZ", "Fuzz", "keyed", "noapi", "NoApi", "missing", "", "fuzz\x00", "fuzz ", "$fuzz"]
TOKEN_VALUES = ["1", "2", "3", "0", "-1", "01", "1.0", "abc", "１", "99999999999999999999", "", " 1", "1\x00",
                "1e3", "0x1", "9" * 5000]
CONTENT_TYPES = [
    None, "", "application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=latin-1",
    "APPLICATION/X-WWW-FORM-URLENCODED", "application/json", "application/json; charset=utf-8",
    "Application/JSON", "text/plain", "text/json", "multipart/form-data; boundary=xyz", "application/xml", ";;;",
    "application/octet-stream",
]
JSON_SCALARS = [b'"x"', b"3", b"true", b"null", b"-0.5e3", b'""', b"[]", b"[1, 2]"]
JSON_INVALID = [
    b"{", b"{'a': 1}", b"\xff\xfe{}", b'{"a":1,}', b"NaN?", b"\x00", b"[" * 100_000, b'{"a":' * 100_000,
    b'{"a": ' + b"1" * 5000 + b"}", b'{"template": "fuzz"', b"{}}",
]
BIG_VALUES = [
    b"a" * 100_000, b"\xff" * 100_000, b"%" * 100_000, ("é" * 50_000).encode(), b"a" * 8192, b"a" * 8193,
    b"\x00", b"a\x00b", "\u2028ERROR: forged".encode(), b"\r\nERROR: forged", b"\x1b[31mred", b"\x85\x0b\x0c",
]


def short(data, limit=60):
    return data if len(data) <= limit else data[:limit] + b"...(%d bytes)" % len(data)


@dataclasses.dataclass
class HostileRequest:
    endpoint: str
    method: str
    query: list  # [(name bytes, value bytes)], percent-escaped into the query string
    body_kind: str  # none, form, json_object, json_array, json_scalar, json_invalid, raw
    body_params: list  # [(name bytes, value bytes, json type)] for form and json_object
    raw_body: bytes  # for json_scalar, json_invalid and raw
    content_type: str | None
    header_key: str | None
    dollar_safe: bool  # leave "$" unescaped in names and values

    def __repr__(self):
        query = [(short(n), short(v)) for n, v in self.query]
        body = [(short(n), short(v), t) for n, v, t in self.body_params]
        return (f"HostileRequest({self.method} {self.endpoint} query={query} body_kind={self.body_kind} "
                f"body={body or short(self.raw_body)} content_type={self.content_type!r} key={self.header_key!r})")

    def encode_pairs(self, pairs) -> str:
        safe = "$" if self.dollar_safe else ""
        return "&".join(urllib.parse.quote_from_bytes(n, safe) + "=" + urllib.parse.quote_from_bytes(v, safe)
                        for n, v in pairs)

    def body(self) -> bytes:
        if self.body_kind == "form":
            return self.encode_pairs([(n, v) for n, v, _ in self.body_params]).encode("ascii")
        if self.body_kind == "json_object":  # written by hand so that repeated keys stay repeated
            members = (json.dumps(n.decode("utf-8", "surrogateescape")) + ":" + json_value(v, t)
                       for n, v, t in self.body_params)
            return ("{" + ",".join(members) + "}").encode("utf-8")
        if self.body_kind == "json_array":
            return json.dumps([[n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")]
                               for n, v, _ in self.body_params]).encode()
        return self.raw_body

    def mimetype(self) -> str:
        return (self.content_type or "").split(";")[0].strip().lower()

    def must_be_refused(self) -> bool:
        """Whether the contract forces a 4xx whatever else the request holds."""
        if self.method not in ("GET", "POST"):
            return True
        body, mimetype = self.body(), self.mimetype()
        if body and mimetype not in ("", "application/x-www-form-urlencoded", "application/json"):
            return True  # 415
        delivered = list(self.query)
        if body and mimetype == "application/json":
            if self.body_kind in ("json_array", "json_scalar", "json_invalid"):
                return True
            if self.body_kind == "json_object":
                members = {}
                for name, value, kind in self.body_params:
                    members[name.decode("utf-8", "surrogateescape")] = (value, kind)
                for name, (value, kind) in members.items():
                    if kind in ("null", "array", "object"):
                        return True
                    if name.lower() != "api_key" and kind == "string":
                        delivered.append((name.encode("utf-8", "surrogateescape"), value))
        elif body and self.body_kind == "form":
            delivered += [(n, v) for n, v, _ in self.body_params]
        folded = []
        for name, value in delivered:
            try:
                name_text, value_text = name.decode("utf-8"), value.decode("utf-8")
            except UnicodeDecodeError:
                return True
            if "\x00" in value_text or len(value) > 8192:
                return True
            folded.append(name_text.removeprefix("$").lower())
        return len(folded) != len(set(folded))


def json_value(value: bytes, kind: str) -> str:
    return {
        "string": lambda: json.dumps(value.decode("utf-8", "surrogateescape")),
        "number": lambda: str(len(value)),
        "bool": lambda: "true",
        "null": lambda: "null",
        "array": lambda: json.dumps([value.decode("utf-8", "replace")]),
        "object": lambda: json.dumps({"nested": {"deeper": [1, {"x": None}]}}),
    }[kind]()


def hostile_requests(payloads: list[str]):
    names = st.one_of(
        st.sampled_from([n.encode() for n in INTERESTING_NAMES]),
        st.binary(max_size=12),
        st.text(max_size=12).map(lambda s: s.encode("utf-8", "surrogatepass")),
    )
    values = st.one_of(
        st.sampled_from([p.encode() for p in payloads]),
        st.binary(max_size=40),
        st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.lists(st.sampled_from(list(range(32)) + [0x7F, 0x80, 0xC3, 0xE2, 0xFE, 0xFF]), max_size=10).map(bytes),
        st.sampled_from(BIG_VALUES),
    )

    @st.composite
    def build(draw):
        endpoint = draw(st.sampled_from(ENDPOINTS))
        method = draw(st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE"]))
        params = draw(st.lists(st.tuples(names, values), max_size=6))
        if draw(st.booleans()) and params:  # the same name again, maybe in another case
            name, _ = draw(st.sampled_from(params))
            params.append((draw(st.sampled_from([name, name.swapcase(), b"$" + name])), draw(values)))
        if endpoint == "/api/jobs/trigger":
            if draw(st.integers(0, 9)) < 8:
                params.insert(0, (b"template", draw(st.sampled_from(TEMPLATE_VALUES)).encode()))
        elif draw(st.integers(0, 9)) < 8:
            params.insert(0, (b"token", draw(st.sampled_from(TOKEN_VALUES)).encode()))
        # A status or logs wait must stay short; only these names make the server wait.
        params = [(n, draw(st.sampled_from(SAFE_WAITS)) if n.lower() == b"wait" else v) for n, v in params]
        params = draw(st.permutations(params))
        body_kind = draw(st.sampled_from(
            ["none", "none", "form", "form", "json_object", "json_object", "json_array", "json_scalar",
             "json_invalid", "raw"]))
        query, body_params = [], []
        for name, value in params:
            if body_kind in ("form", "json_object", "json_array") and draw(st.booleans()):
                kind = draw(st.sampled_from(["string"] * 6 + ["number", "bool", "null", "array", "object"]))
                body_params.append((name, value, kind))
            else:
                query.append((name, value))
        raw_body = b""
        if body_kind == "json_scalar":
            raw_body = draw(st.sampled_from(JSON_SCALARS))
        elif body_kind == "json_invalid":
            raw_body = draw(st.sampled_from(JSON_INVALID))
        elif body_kind == "raw":
            raw_body = draw(st.binary(max_size=200))
        default_type = {"form": "application/x-www-form-urlencoded"}.get(
            body_kind, "application/json" if body_kind.startswith("json") else None)
        content_type = default_type if draw(st.integers(0, 3)) else draw(st.sampled_from(CONTENT_TYPES))
        header_key = draw(st.sampled_from([None, None, "s3cret", "wrong", "", "S3CRET", "s3cret "]))
        return HostileRequest(endpoint, method, query, body_kind, body_params, raw_body, content_type,
                              header_key, draw(st.booleans()))

    @st.composite
    def plausible_trigger(draw):
        """A trigger of the fuzz template that might well be accepted, so that jobs really run."""
        template = draw(st.sampled_from([b"fuzz", b"FUZZ", b"Fuzz"]))
        name = draw(st.sampled_from([b"Payload", b"payload", b"$Payload", b"NewVar", b"$other_1", b"X"]))
        value = draw(st.one_of(st.sampled_from([p.encode() for p in payloads]),
                               st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))))
        params = [(b"template", template), (name, value)]
        if draw(st.booleans()):
            params.append((b"Choice", draw(st.sampled_from([b"a", b"b", b"c"]))))
        in_body = draw(st.booleans())
        body_params = [(n, v, "string") for n, v in params if in_body and n != b"template"]
        query = [(n, v) for n, v in params if not in_body or n == b"template"]
        body_kind = draw(st.sampled_from(["form", "json_object"])) if body_params else "none"
        content_type = {"form": "application/x-www-form-urlencoded", "json_object": "application/json"}.get(body_kind)
        return HostileRequest("/api/jobs/trigger", draw(st.sampled_from(["GET", "POST"])), query, body_kind,
                              body_params, b"", content_type, None, draw(st.booleans()))

    return st.one_of(build(), build(), plausible_trigger())


def test_random_requests_never_5xx_and_never_run_unasked_commands(make_app, tmp_path):
    marker, cwd = tmp_path / "MARKER", tmp_path / "cwd"
    cwd.mkdir()
    client = make_app(FUZZ_TEMPLATES.replace("MARKER", str(marker)).replace("CWD", str(cwd)))
    # Jobs 1-3 exist, finished, so that status, logs and cancel meet real tokens and a keyed job.
    tokens = [client.get("/api/jobs/trigger", {"template": "fuzz", "Payload": "seed"}).text,
              client.get("/api/jobs/trigger", {"template": "fuzz"}).text,
              client.get("/api/jobs/trigger", {"template": "keyed", "key": "s3cret"}).text]
    assert tokens == ["1", "2", "3"]
    for token in tokens:
        final_status(client, token, key="s3cret" if token == "3" else None)
    seen = {"statuses": set(), "triggered": 0}

    @settings(max_examples=250, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(hostile_requests(injection_payloads(str(marker))))
    def check(req: HostileRequest):
        url = req.endpoint + ("?" + req.encode_pairs(req.query) if req.query else "")
        headers = {}
        if req.content_type is not None:
            headers["Content-Type"] = req.content_type
        if req.header_key is not None:
            headers["X-ApiKey"] = req.header_key
        response = client.request(url, method=req.method, body=req.body(), headers=headers, expect_errors=True)
        seen["statuses"].add(response.status_int)

        assert response.status_int < 500, f"{response.status}: {response.body[:300]!r}"
        assert response.headers["Content-Type"] == TEXT, response.headers
        if response.status_int >= 400:
            assert_reason(response)
            if response.status_int == 405:
                assert "Allow" in response.headers
        else:
            assert response.status_int == 200, response.status
            assert not req.must_be_refused(), f"accepted with 200 although malformed: {response.text[:200]!r}"
            text = response.body.decode("utf-8")
            if req.endpoint == "/api/jobs/trigger":
                assert re.fullmatch(r"[1-9][0-9]*", text), text
                seen["triggered"] += 1
                key = "s3cret"  # the job's own template decides whether the key counts
                status = final_status(client, text, key=key)
                assert status in ("Succeeded", "Warning", "Error")
                logs_of(client, text, key=key)
            elif req.endpoint == "/api/jobs/logs":
                assert_well_formed_log(response.body.decode("utf-8"))  # strict: the body is valid UTF-8
            else:
                assert text in STATUS_WORDS, text
        assert not marker.exists(), f"a command ran that no template step asked for: {req!r}"
        assert list(cwd.iterdir()) == [], f"a job created files in its cwd: {list(cwd.iterdir())}"

    check()
    # The generator reached past the front door: some jobs ran, and several kinds of refusal were seen.
    assert seen["triggered"] >= 10, seen
    assert {200, 400}.issubset(seen["statuses"]), seen


#
# Log forging.
#

# Writes the bytes given in hex: argv[1] to stdout, argv[2] to stderr.
WRITE_BYTES = "import os, sys; os.write(1, bytes.fromhex(sys.argv[1])); os.write(2, bytes.fromhex(sys.argv[2]))"
FORGE_TEMPLATES = f"""
[out]
[out.variables]
Out = {{ default = "", pattern = '[0-9a-f]*' }}
Err = {{ default = "", pattern = '[0-9a-f]*' }}

[[out.steps]]
exec = ["{sys.executable}", "-c", "{WRITE_BYTES}", "$Out", "$Err"]

[echo]
[echo.variables]
Text = {{ default = "", pattern = '(?s).*' }}

[[echo.steps]]
log = "$Text"

[[echo.steps]]
run = 'printf "%s\\n" "$Text"'

[[echo.steps]]
exec = ["printf", "%s\\n", "$Text"]
"""


@pytest.fixture(scope="module")
def forge(request, tmp_path_factory):
    """One app for the forging tables: each test reads only its own job."""
    with module_app(request, tmp_path_factory, FORGE_TEMPLATES) as client:
        yield client


@pytest.mark.parametrize("stream, level, status", [("Out", "INFO", "Succeeded"), ("Err", "WARN", "Warning")])
def test_output_that_looks_like_a_log_entry_is_logged_at_the_step_level(forge, stream, level, status):
    client = forge
    printed = b"ERROR: fake\nDEBUG: also fake\n"
    token = client.get("/api/jobs/trigger", {"template": "out", stream: printed.hex()}).text
    assert final_status(client, token) == status
    assert logs_of(client, token) == f"{level}: ERROR: fake\n{level}: DEBUG: also fake\n"


HOSTILE_OUTPUTS = [
    b"a\rERROR: cr\n",
    b"a\r\n",
    b"\r\n",
    b"\rERROR: lone cr at the start\n",
    b"b\x00ERROR: nul\n",
    b"c\x0bERROR: vertical tab\n",
    b"d\x0cERROR: form feed\n",
    b"e\x1cERROR: fs\x1dERROR: gs\x1eERROR: rs\n",
    "f\u0085ERROR: nel\n".encode(),
    "g\u2028ERROR: line separator\n".encode(),
    "h\u2029ERROR: paragraph separator\n".encode(),
    b"i\xffERROR: invalid utf-8 \xc3\x28 \xe2\x82 \xed\xa0\x80\n",
    b"j\xe2\x80",  # a truncated \u2028 at the very end, no newline
    b"k\x1b[2K\x1b[1GERROR: terminal escapes\n",
    b"\x00\r\x0b\x0c\x85\xe2\x80\xa8\xe2\x80\xa9\r\n",
    b"no newline at the end\rERROR: x",
]


@pytest.mark.parametrize("printed", HOSTILE_OUTPUTS, ids=range(len(HOSTILE_OUTPUTS)))
def test_hostile_output_is_stored_and_served_with_real_levels(forge, printed):
    client = forge
    token = client.get("/api/jobs/trigger", {"template": "out", "Out": printed.hex(), "Err": printed.hex()}).text
    assert final_status(client, token) == "Warning"  # stderr lines are WARN, nothing is an ERROR
    text = logs_of(client, token)
    entries = text.split("\n")[:-1]
    expected = len(output_lines(printed.decode("latin-1")))  # one entry per \n-terminated line of each stream
    assert len(entries) == 2 * expected, text
    assert sum(e.startswith("INFO: ") for e in entries) == expected, text
    assert sum(e.startswith("WARN: ") for e in entries) == expected, text
    # The printed text survives inside the entries (only the unsafe characters may be replaced).
    for fragment in re.findall(rb"ERROR: [a-z -]+", printed):
        assert sum(fragment.decode() in e for e in entries) == 2, (fragment, text)


def test_request_values_with_line_breaks_cannot_forge_entries(forge):
    client = forge
    value = "x\nERROR: forged 1\rERROR: forged 2\x0bERROR: forged 3\u2028ERROR: forged 4\x85ERROR: forged 5"
    token = client.post("/api/jobs/trigger", {"template": "echo", "Text": value}).text
    assert final_status(client, token) == "Succeeded"
    entries = logs_of(client, token).split("\n")[:-1]
    assert len(entries) == 6  # "x" and the rest, from each of the three steps
    assert all(e.startswith("INFO: ") for e in entries)
    assert entries[0::2] == ["INFO: x"] * 3


#
# Command injection through variables.
#

# Four steps that print VAR from a run and from an exec step, as it is and in hex (REF: how exec names it).
INJECTION_STEPS = """
[[NAME.steps]]
run = 'printf "run[%s]\\n" "$VAR"'
cwd = "CWD"

[[NAME.steps]]
exec = ["printf", 'exec[%s]\\n', "REF"]
cwd = "CWD"

[[NAME.steps]]
exec = ["printf", "%s", "$VAR"]
cwd = "CWD"

[[NAME.steps]]
run = 'printf "%s" "$VAR" | od -An -v -tx1 | tr -d " \\n"'
cwd = "CWD"
"""

INJECTION_TEMPLATES = (
    "[declared]\n[declared.variables]\nVar = { default = \"\", pattern = '(?s).*' }\n"
    + INJECTION_STEPS.replace("NAME", "declared").replace("REF", "$Var").replace("VAR", "Var")
    + "\n[undeclared]\nallow_new_variables = true\n"
    + INJECTION_STEPS.replace("NAME", "undeclared").replace("REF", "${Payload}").replace("VAR", "Payload"))


@pytest.mark.parametrize("template, variable", [("declared", "Var"), ("undeclared", "Payload")],
                         ids=["declared-with-permissive-pattern", "allow_new_variables"])
def test_injection_payloads_execute_nothing_and_arrive_byte_for_byte(make_app, tmp_path, template, variable):
    marker, cwd = tmp_path / "pwned-marker", tmp_path / "cwd"
    cwd.mkdir()
    client = make_app(INJECTION_TEMPLATES.replace("CWD", str(cwd)))
    payloads = injection_payloads(str(marker))
    tokens = {}
    for payload in payloads:
        tokens[payload] = client.post("/api/jobs/trigger", {"template": template, variable: payload}).text
    problems = []
    for payload, token in tokens.items():
        status = final_status(client, token)
        expected = "".join(
            f"INFO: {line}\n"
            for line in output_lines(f"run[{payload}]\n") + output_lines(f"exec[{payload}]\n")
            + output_lines(payload) + output_lines(payload.encode().hex())
        )
        got = logs_of(client, token)
        if (status, got) != ("Succeeded", expected):
            problems.append(f"{payload!r}: {status}\n  expected {expected!r}\n  got      {got!r}")
    assert not marker.exists(), "an injection payload ran a command"
    assert list(cwd.iterdir()) == [], f"an injection payload created files: {list(cwd.iterdir())}"
    assert not problems, "\n".join(problems)

"""Hostile input (issue 3) and the Variables rules of issue 2 that guard against it.

- A hypothesis property test throws random parameter names, values, bodies and content types at every endpoint:
  never a 5xx, every 4xx a short plain-text reason, malformed input always refused, well-formed logs, and no
  command runs that a template did not ask for.
- A job's output cannot forge log entries, whatever bytes it prints.
- Command-injection payloads passed as variables to `run` and `exec` steps execute nothing and arrive byte for byte.
- allow_new_variables = true still refuses the names that change how programs run.
"""

import dataclasses
import json
import re
import sys
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app as server_module
from conftest import final_status

ENDPOINTS = ("/api/jobs/trigger", "/api/jobs/status", "/api/jobs/logs", "/api/jobs/cancel")
STATUS_WORDS = ("Pending", "Executing", "Succeeded", "Warning", "Error")
LEVEL_PREFIXES = ("DEBUG: ", "INFO: ", "WARN: ", "ERROR: ")
TEXT_PLAIN = "text/plain; charset=utf-8"
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


def assert_well_formed_log(body: bytes) -> str:
    """Every served line starts with a real level prefix, whatever splits lines for the reader."""
    text = body.decode("utf-8")  # strict: the body is valid UTF-8
    assert "\x00" not in text, f"NUL served in the log: {text[:300]!r}"
    assert text == "" or text.endswith("\n"), f"log does not end with a newline: {text[-100:]!r}"
    for piece in text.splitlines():
        assert piece.startswith(LEVEL_PREFIXES), f"a served line has no level prefix: {piece[:200]!r}"
    return text


def logs_of(client, token) -> str:
    response = client.get("/api/jobs/logs", {"token": token})
    assert response.headers["Content-Type"] == TEXT_PLAIN
    return assert_well_formed_log(response.body)


def assert_reason(response):
    """A 4xx: non-empty short plain text that says what was wrong, no traceback."""
    assert response.headers["Content-Type"] == TEXT_PLAIN, response.headers
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
        assert response.headers["Content-Type"] == TEXT_PLAIN, response.headers
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
                logs_text = client.get("/api/jobs/logs", {"token": text, "key": key}).body
                assert_well_formed_log(logs_text)
            elif req.endpoint == "/api/jobs/logs":
                assert_well_formed_log(response.body)
            else:
                assert text in STATUS_WORDS, text
        assert not marker.exists(), f"a command ran that no template step asked for: {req!r}"
        assert list(cwd.iterdir()) == [], f"a job created files in its cwd: {list(cwd.iterdir())}"

    check()
    # The generator reached past the front door: some jobs ran, and several kinds of refusal were seen.
    assert seen["triggered"] >= 10, seen
    assert {200, 400}.issubset(seen["statuses"]), seen


#
# Fixed tables of hostile bodies: exact status and reason.
#

FLAT_TEMPLATES = """
[t]
allow_new_variables = true

[[t.steps]]
log = "hi"
"""


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 2000 + b"]" * 2000],
                         ids=["arrays-100k-deep", "objects-100k-deep", "arrays-2k-deep"])
def test_deeply_nested_json_body_is_400(make_app, endpoint, body):
    client = make_app(FLAT_TEMPLATES)
    response = client.post(endpoint + "?template=t&token=1", body, content_type="application/json",
                           expect_errors=True)
    assert response.status_int == 400, f"{response.status}: {response.text[:200]!r}"
    assert_reason(response)


@pytest.mark.parametrize("body, content_type, status, reason", [
    (b"[1, 2]", "application/json", 400, "A JSON request body must be an object"),
    (b'"template"', "application/json", 400, "A JSON request body must be an object"),
    (b"42", "application/json", 400, "A JSON request body must be an object"),
    (b"null", "application/json", 400, "A JSON request body must be an object"),
    (b"{", "application/json", 400, "The request body is not valid JSON"),
    (b"\xff\xfe\xfd", "application/json", 400, "The request body is not valid JSON"),
    (b'{"template": "t", "A": {"b": 1}}', "application/json", 400,
     "JSON member 'A' must be a string, number or boolean"),
    (b'{"template": "t", "A": [1]}', "application/json", 400, "JSON member 'A' must be a string, number or boolean"),
    (b'{"template": "t", "A": null}', "application/json", 400,
     "JSON member 'A' must be a string, number or boolean"),
    (b'{"template": "t", "A": "\\u0000"}', "application/json", 400, "Parameter 'A' contains a NUL character"),
    (b'{"template": "t", "A": "\\ud800"}', "application/json", 400, "Parameter 'A' is not valid UTF-8 text"),
    (b"template=t&A=%ff", "application/x-www-form-urlencoded", 400, "The request body is not valid UTF-8"),
    (b"template=t&A=%00", "application/x-www-form-urlencoded", 400, "Parameter 'A' contains a NUL character"),
    (b"template=t&A=1&a=2", "application/x-www-form-urlencoded", 400, "Parameter 'a' is given more than once"),
    (b"template=t&A=1&$a=2", "application/x-www-form-urlencoded", 400, "Parameter '$a' is given more than once"),
    (b"template=t", "text/plain", 415,
     "Unsupported Content-Type 'text/plain': send application/x-www-form-urlencoded or application/json"),
    (b"<x/>", "application/xml", 415,
     "Unsupported Content-Type 'application/xml': send application/x-www-form-urlencoded or application/json"),
])
def test_hostile_bodies_are_refused_with_a_reason(make_app, body, content_type, status, reason):
    client = make_app(FLAT_TEMPLATES)
    response = client.post("/api/jobs/trigger", body, content_type=content_type, expect_errors=True)
    assert (response.status_int, response.text) == (status, reason)
    assert response.headers["Content-Type"] == TEXT_PLAIN
    # Nothing was queued: the first job accepted afterwards gets token 1.
    assert client.get("/api/jobs/trigger", {"template": "t"}).text == "1"


@pytest.mark.parametrize("query, reason", [
    ("template=t&A=%ff%fe", "The query string is not valid UTF-8"),
    ("template=t&%c3=1", "The query string is not valid UTF-8"),
    ("template=t&A=a%00b", "Parameter 'A' contains a NUL character"),
    ("template=t&A=" + "a" * 100_000, "Parameter 'A' is longer than 8 KiB"),
    ("template=t&A=1&A=2", "Parameter 'A' is given more than once"),
    ("template=t&Abc=1&aBC=2", "Parameter 'aBC' is given more than once"),
    ("template=t&template=t", "Parameter 'template' is given more than once"),
    ("template=t&TEMPLATE=t", "Parameter 'TEMPLATE' is given more than once"),
])
def test_hostile_query_strings_are_refused_with_a_reason(make_app, query, reason):
    client = make_app(FLAT_TEMPLATES)
    for method in ("GET", "POST"):
        response = client.request("/api/jobs/trigger?" + query, method=method, expect_errors=True)
        assert (response.status_int, response.text) == (400, reason)


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


@pytest.mark.parametrize("stream, level, status", [("Out", "INFO", "Succeeded"), ("Err", "WARN", "Warning")])
def test_output_that_looks_like_a_log_entry_is_logged_at_the_step_level(make_app, stream, level, status):
    client = make_app(FORGE_TEMPLATES)
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
def test_hostile_output_is_stored_and_served_with_real_levels(make_app, printed):
    client = make_app(FORGE_TEMPLATES)
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


def test_request_values_with_line_breaks_cannot_forge_entries(make_app):
    client = make_app(FORGE_TEMPLATES)
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

INJECTION_TEMPLATES = """
[declared]
[declared.variables]
Var = { default = "", pattern = '(?s).*' }

[[declared.steps]]
run = 'printf "run[%s]\\n" "$Var"'
cwd = "CWD"

[[declared.steps]]
exec = ["printf", 'exec[%s]\\n', "$Var"]
cwd = "CWD"

[[declared.steps]]
exec = ["printf", "%s", "$Var"]
cwd = "CWD"

[[declared.steps]]
run = 'printf "%s" "$Var" | od -An -v -tx1 | tr -d " \\n"'
cwd = "CWD"

[undeclared]
allow_new_variables = true

[[undeclared.steps]]
run = 'printf "run[%s]\\n" "$Payload"'
cwd = "CWD"

[[undeclared.steps]]
exec = ["printf", 'exec[%s]\\n', "${Payload}"]
cwd = "CWD"

[[undeclared.steps]]
exec = ["printf", "%s", "$Payload"]
cwd = "CWD"

[[undeclared.steps]]
run = 'printf "%s" "$Payload" | od -An -v -tx1 | tr -d " \\n"'
cwd = "CWD"
"""


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


#
# allow_new_variables does not open the reserved names.
#

RESERVED_NAMES = [
    "PATH", "path", "Path", "$PATH", "HOME", "SHELL", "USER", "IFS", "ENV", "BASH_ENV", "CDPATH", "PS4", "SHELLOPTS",
    "BASHOPTS", "TMPDIR", "LD_PRELOAD", "ld_library_path", "LD_AUDIT", "DYLD_INSERT_LIBRARIES", "BASH_FUNC_x",
    "PYTHONPATH", "PYTHONSTARTUP", "pythonhome", "PERL5OPT", "PERLLIB", "RUBYOPT", "NODE_OPTIONS", "GIT_SSH_COMMAND",
    "SSH_AUTH_SOCK", "LC_ALL", "lc_ctype", "HTTP_PROXY", "https_proxy", "All_Proxy", "$template", "$key", "$token",
    "token", "Token",
    # Beyond the list, documented in the README: names through which glibc loads code or files.
    "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "MALLOC_CHECK_",
    "GETCONF_DIR", "LOCALDOMAIN", "NIS_PATH", "RES_OPTIONS", "TZDIR", "TZ", "tz", "LANG", "LANGUAGE",
]

RESERVED_TEMPLATES = """
[open]
allow_new_variables = true

[[open.steps]]
run = 'echo "$PATH"'
"""


@pytest.mark.parametrize("source", ["query", "form", "json"])
@pytest.mark.parametrize("name", RESERVED_NAMES)
def test_reserved_names_are_refused_even_with_allow_new_variables(make_app, name, source):
    client = make_app(RESERVED_TEMPLATES)
    value = "/tmp/evil"
    if source == "query":
        response = client.get("/api/jobs/trigger", {"template": "open", name: value}, expect_errors=True)
    elif source == "form":
        response = client.post("/api/jobs/trigger", {"template": "open", name: value}, expect_errors=True)
    else:
        response = client.post_json("/api/jobs/trigger", {"template": "open", name: value}, expect_errors=True)
    assert response.status_int == 400, f"{name} from the {source}: {response.status} {response.text!r}"
    assert name.removeprefix("$").lower() in response.text.lower(), response.text
    assert_reason(response)
    # No job was created: the next accepted trigger gets token 1.
    assert client.get("/api/jobs/trigger", {"template": "open"}).text == "1"


#
# A process's output cut into entries and masked, fed to OutputCutter and Masker directly in chunks of our
# choosing (secrets were once stored in part when a read or a 64 KiB cut fell inside them).
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

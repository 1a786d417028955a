"""The web page for people, in process (WebTest): the HTML of /, /jobs/<token> and /templates/<name>, their
headers and status codes, keys, the page's own forms and the cross-site rules, text never taken for HTML, and
the pages at 100,000 jobs and at a million log entries.

What a real browser does with these pages (scripts, live updates, focus, screens) is tests/test_browser.py's."""

import contextlib
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; base-uri 'none';"
       " form-action 'self'")
HTML = "text/html; charset=utf-8"
KEY = "vault-key-8d1f4c"
SECRET = "hunter2-never-shown"
FINAL = ("Succeeded", "Warning", "Error")

# Script-injection payloads: each would set window.__pwned (or the title) if a page took it for HTML, a URL
# or a template. test_browser.py loads them in a real browser; here the HTML must carry them as text.
PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "<script>window.__pwned=1</script>",
    "<ScRiPt>window.__pwned=1</sCrIpT>",
    '<img src=x onerror="window.__pwned=1">',
    "<img src=x onerror=window.__pwned=1//",
    '<svg onload="window.__pwned=1">',
    "<svg><script>window.__pwned=1</script></svg>",
    "<svg><animate onbegin=window.__pwned=1 attributeName=x dur=1s>",
    '<iframe srcdoc="<script>parent.__pwned=1</script>"></iframe>',
    '<iframe src="javascript:parent.__pwned=1"></iframe>',
    '<body onload="window.__pwned=1">',
    '<details open ontoggle="window.__pwned=1">',
    '<a href="javascript:window.__pwned=1" id=pwn>click</a>',
    "javascript:window.__pwned=1",
    '"><script>window.__pwned=1</script>',
    "'><img src=x onerror=window.__pwned=1>",
    '" autofocus onfocus="window.__pwned=1" x="',
    "' autofocus onfocus='window.__pwned=1' x='",
    "</textarea><script>window.__pwned=1</script>",
    "</title><script>window.__pwned=1</script>",
    "</code></td></tr></table><script>window.__pwned=1</script>",
    "</span></li></ol><img src=x onerror=window.__pwned=1>",
    "${window.__pwned=1}",
    "`${window.__pwned=1}`",
    "{{7*7}}",
    "{{ config.items() }}",
    "{% for x in range(3) %}{{ x }}{% endfor %}",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__pwned=1>",
    '<object data="javascript:window.__pwned=1"></object>',
    '<embed src="javascript:window.__pwned=1">',
    "<video><source onerror=window.__pwned=1></video>",
    "<audio src=x onerror=window.__pwned=1>",
    "<input autofocus onfocus=window.__pwned=1>",
    "<style>*{background:url(javascript:window.__pwned=1)}</style>",
    '<div style="background:url(javascript:window.__pwned=1)">x</div>',
    '<meta http-equiv="refresh" content="0;url=javascript:window.__pwned=1">',
    '<base href="javascript:window.__pwned=1//">',
    '<form action="javascript:window.__pwned=1"><button id=pwnbutton>go</button></form>',
    "<scr<script>ipt>window.__pwned=1</scr</script>ipt>",
    "&lt;script&gt;window.__pwned=1&lt;/script&gt;",
    '<!--<img src="--><img src=x onerror=window.__pwned=1//">',
    '<noscript><p title="</noscript><img src=x onerror=window.__pwned=1>">',
    '<img src=x onerror=document.title="pwned">',
    "<script src=/static/page.js></script><script>document.title='pwned'</script>",
]
assert len(PAYLOADS) >= 30 and len(set(PAYLOADS)) == len(PAYLOADS)

# $GATES/<token> lets a job that waits for it go on; $GATES/all lets every one go (at the end of a test).
TEMPLATES = """
[greet]
description = "Says hello to <b>someone</b> & nobody else"

[greet.variables]
Name = { default = "world", pattern = '[A-Za-z]+', required = true, description = "Who to <i>greet</i>" }
Color = { default = "red", choices = ["red", "green", "blue"], description = "A colour to say it in" }
Password = { secret = true, description = "Only the job sees it" }

[[greet.steps]]
run = 'echo "hello $Name in $Color with $Password"; echo "careful, $Name" >&2'

[needed]
[needed.variables]
Target = { required = true, pattern = '[a-z]+' }

[[needed.steps]]
log = "target $Target"

[echo]
description = "Prints its variables"
allow_new_variables = true

[echo.variables]
Text = { default = "", description = "Any text" }

[[echo.steps]]
run = '''printf '%s\\n' "$Text" PRINTS'''

[vault]
description = "Needs a key"
key = "KEY"
allow_new_variables = true

[vault.variables]
Target = "alpha"
Password = { secret = true, default = "" }

[[vault.steps]]
run = 'echo "vault opened for $Target"; until [ -e "GATES/$JobToken" ] || [ -e GATES/all ]; do sleep 0.02; done'

[wait]
timeout = 60

[wait.variables]
Label = "plain"

[[wait.steps]]
run = 'echo "started $Label"; until [ -e "GATES/$JobToken" ] || [ -e GATES/all ]; do sleep 0.02; done; echo released'

[single]
max_concurrent = 1

[[single.steps]]
run = 'echo "single $JobToken"; until [ -e "GATES/$JobToken" ] || [ -e GATES/all ]; do sleep 0.02; done'

[fail]
[[fail.steps]]
run = 'echo "about to fail"; exit 3'

[quick]
[[quick.steps]]
log = "quick"

[hidden]
description = "Not for the API"
api = false

[[hidden.steps]]
log = "hidden"
""".replace("KEY", KEY).replace("PRINTS", " ".join(f'"$P{i:02d}"' for i in range(len(PAYLOADS))))


def query(database: str, sql: str, *args) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as db:
        return db.execute(sql, args).fetchall()


def job_count(database: str) -> int:
    return query(database, "SELECT count(*) FROM jobs")[0][0]


class Site:
    """An app under WebTest, acting like a browser on http://localhost (a Host without a port), with the
    gates its waiting jobs wait for."""

    def __init__(self, client, gates: Path):
        self.client, self.gates = client, gates
        self.app = client.app
        self.database = client.app.config["DATABASE"]

    def trigger(self, template, key=None, **variables) -> str:
        params = {"template": template, **variables}
        if key:
            params["key"] = key
        response = self.client.post("/api/jobs/trigger", urllib.parse.urlencode(params),
                                    content_type="application/x-www-form-urlencoded")
        return response.text

    def final(self, token, key=None) -> str:
        """Wait (the API's status&wait) until the job is final; its status."""
        params = {"token": token, "wait": 30, **({"key": key} if key else {})}
        status = self.client.get("/api/jobs/status", params).text
        assert status in FINAL, f"job {token} still {status}"
        return status

    def status(self, token, key=None) -> str:
        params = {"token": token, **({"key": key} if key else {})}
        return self.client.get("/api/jobs/status", params).text

    def release(self, token) -> None:
        (self.gates / str(token)).touch()

    def wait_status(self, token, status, key=None, timeout=10):
        wait_for(lambda: self.status(token, key) == status, timeout, what=f"job {token} to be {status}")

    def wait_log(self, token, text, key=None, timeout=10):
        params = {"token": token, **({"key": key} if key else {})}
        wait_for(lambda: text in self.client.get("/api/jobs/logs", params).text, timeout,
                 what=f"job {token} to log {text!r}")

    def page(self, path, status=200, **kwargs):
        response = self.client.get(path, status=status, **kwargs)
        assert_page_headers(response)
        return response


@pytest.fixture
def site(make_app, tmp_path):
    gates = tmp_path / "gates"
    gates.mkdir()
    client = make_app(TEMPLATES.replace("GATES", str(gates)), WORKERS=4, CANCEL_GRACE=1)
    # Browsers send Host without the default port. (With WebTest's own "localhost:80", see
    # test_same_origin_post_with_explicit_default_port.)
    client.extra_environ["HTTP_HOST"] = "localhost"
    yield Site(client, gates)
    (gates / "all").touch()  # no job is left waiting when the app shuts down


def assert_page_headers(response, status=None):
    if status is not None:
        assert response.status_int == status
    headers = response.headers
    assert headers["Content-Security-Policy"] == CSP, headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"
    assert "Set-Cookie" not in headers


def text(element) -> str:
    return " ".join(element.get_text().split())


def job_rows(response) -> list[dict]:
    """The rows of the job list: token (the link's text), href, template, status (word and class), time."""
    rows = []
    for tr in response.html.select("table.jobs tbody tr"):
        cells = tr.find_all("td")
        if len(cells) == 1:  # "No jobs yet."
            continue
        link = cells[0].find("a")
        word = cells[2].find("span", class_="status")
        moment = cells[3].find("time")
        rows.append({
            "token": link.get_text(), "href": link["href"], "template": cells[1].get_text(),
            "status": word.get_text() if word else None, "classes": word["class"] if word else [],
            "datetime": moment["datetime"] if moment else None, "time": moment.get_text() if moment else None,
            "duration": cells[4].get_text(),
        })
    return rows


def older_link(response) -> str | None:
    link = response.html.select_one("nav.paging a[rel=next]")
    return link["href"] if link else None


def problems(response) -> dict[str, str]:
    """The reasons shown in a form page: element id -> text, for every visible problem."""
    return {p.get("id", ""): text(p) for p in response.html.select(".problem") if not p.has_attr("hidden")}


def log_messages(response) -> list[tuple[str, str]]:
    return [(li.select_one(".level").get_text(), li.select_one(".message").get_text())
            for li in response.html.select("#log li.entry")]


def variables_shown(response) -> dict[str, str]:
    shown = {}
    for tr in response.html.select("#job-variables tbody tr"):
        name, value = tr.find("th"), tr.find("td")
        if name is not None:
            shown[name.get_text()] = value.get_text()
    return shown


def submit(form, status="*", **headers):
    """Submit a WebTest form as the page would (its hidden page-token included)."""
    return form.submit(status=status, headers=headers or None)


def post_form(site, path, fields, status="*", headers=None):
    body = urllib.parse.urlencode(fields, doseq=True)
    return site.client.post(path, body, content_type="application/x-www-form-urlencoded", status=status,
                            headers=headers)


def page_token_of(response) -> str:
    return response.html.select_one('input[name="page-token"]')["value"]


def unlocked_page(site, token, key=KEY):
    """A keyed job's page as the no-JavaScript key form shows it."""
    locked = site.page(f"/jobs/{token}", status=403)
    form = locked.forms["key-form"]
    form["key"] = key
    response = submit(form)
    assert_page_headers(response)
    return response


#
# The list of jobs: GET /
#


def test_job_list_rows_newest_first(site):
    succeeded = site.trigger("greet", Name="Ann")  # says something on stderr: Warning
    assert site.final(succeeded) == "Warning"
    quick = site.trigger("quick")
    failed = site.trigger("fail")
    assert (site.final(quick), site.final(failed)) == ("Succeeded", "Error")
    running = site.trigger("single")
    site.wait_status(running, "Executing")
    pending = site.trigger("single")  # max_concurrent = 1: waits for the first one
    response = site.page("/")
    assert response.content_type == "text/html" and response.headers["Content-Type"] == HTML
    rows = job_rows(response)
    assert [row["token"] for row in rows] == [pending, running, failed, quick, succeeded]
    statuses = {row["token"]: row["status"] for row in rows}
    assert statuses == {pending: "Pending", running: "Executing", failed: "Error", quick: "Succeeded",
                        succeeded: "Warning"}
    for row in rows:
        assert row["href"] == f"/jobs/{row['token']}"
        assert f"status-{row['status'].lower()}" in row["classes"]  # a colour, and the word as text
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["datetime"]), row
        assert row["time"].endswith("UTC")  # the script shows it in the browser's zone
    by_token = {row["token"]: row for row in rows}
    assert by_token[pending]["duration"] == ""  # has not run
    for token in (running, failed, quick, succeeded):  # how long it ran, or has been running
        assert re.fullmatch(r"\d+\.\d s|\d+ min \d\d s", by_token[token]["duration"]), by_token[token]
    assert {row["template"] for row in rows} == {"greet", "quick", "fail", "single"}
    site.release(running)
    site.final(running)
    site.release(pending)
    site.final(pending)


def test_job_list_templates_to_run(site):
    response = site.page("/")
    links = {a.get_text(): a["href"] for a in response.html.select("ul.templates li a")}
    assert links == {name: f"/templates/{name}" for name in
                     ("echo", "fail", "greet", "needed", "quick", "single", "vault", "wait")}
    assert "Says hello to <b>someone</b> & nobody else" in text(response.html.select_one("ul.templates"))
    assert "<b>someone</b>" not in response.text  # as text, not HTML
    vault = next(li for li in response.html.select("ul.templates li") if li.a.get_text() == "vault")
    assert "key" in text(vault)


def test_job_list_filters_are_links(site):
    greet = site.trigger("greet")
    quick = site.trigger("quick")
    failed = site.trigger("fail")
    for token in (greet, quick, failed):
        site.final(token)
    form = site.page("/").html.select_one("form.filters")
    assert form["method"] == "get" and form["action"] == "/"
    assert {s["name"] for s in form.select("select")} == {"template", "status"}
    assert [o["value"] for o in form.select("select[name=status] option")] == [
        "", "Pending", "Executing", "Succeeded", "Warning", "Error"]

    assert [r["token"] for r in job_rows(site.page("/?template=quick"))] == [quick]
    assert [r["token"] for r in job_rows(site.page("/?status=Error"))] == [failed]
    assert [r["token"] for r in job_rows(site.page("/?template=greet&status=Warning"))] == [greet]
    assert job_rows(site.page("/?template=greet&status=Error")) == []
    filtered = site.page("/?template=quick&status=Succeeded")
    assert filtered.html.select_one("#filter-template option[selected]")["value"] == "quick"
    assert filtered.html.select_one("#filter-status option[selected]")["value"] == "Succeeded"
    # the filter form, submitted, is the same link
    assert site.page("/").forms[0].submit().request.path_qs == "/?template=&status="


def fill_jobs(site, template: str, count: int, status_of=None, start: float | None = None) -> None:
    """Add `count` finished jobs of a template straight to the database, in one statement (fast)."""
    version = site.app.extensions["jobserver"].catalog.get(template).version
    status_sql = status_of or "CASE x % 10 WHEN 0 THEN 'Error' WHEN 1 THEN 'Warning' ELSE 'Succeeded' END"
    start = time.time() - count - 60 if start is None else start
    with sqlite3.connect(site.database, timeout=10) as db:
        db.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?)"
            " INSERT INTO jobs (template_version, template, status, variables, created_at, started_at, finished_at)"
            f" SELECT ?, ?, {status_sql}, '{{\"Label\": \"filled\"}}', ? + x, ? + x + 0.25, ? + x + 1.75 FROM c",
            (count, version, template, start, start, start))
    db.close()


def test_job_list_pages_of_50_back_through_older_jobs(site):
    fill_jobs(site, "quick", 120)
    first = site.page("/")
    rows = job_rows(first)
    assert len(rows) == 50
    tokens = [int(r["token"]) for r in rows]
    assert tokens == sorted(tokens, reverse=True) and tokens[0] == 120
    assert older_link(first) == f"/?before={tokens[-1]}"
    second = site.page(older_link(first))
    second_tokens = [int(r["token"]) for r in job_rows(second)]
    assert second_tokens == list(range(tokens[-1] - 1, tokens[-1] - 51, -1))
    assert second.html.find("a", string="Newest jobs")["href"] == "/"
    third = site.page(older_link(second))
    assert [int(r["token"]) for r in job_rows(third)] == list(range(20, 0, -1))
    assert older_link(third) is None
    # filters are kept in the paging links
    filtered = site.page("/?template=quick&status=Succeeded")
    assert older_link(filtered).startswith("/?template=quick&status=Succeeded&before=")
    assert all(r["status"] == "Succeeded" for r in job_rows(site.page(older_link(filtered))))
    site.client.get("/?before=abc", status=400)
    site.client.get("/?status=Nonsense", status=400)


def test_api_false_template_neither_listed_nor_runnable(site):
    response = site.page("/")
    assert "hidden" not in [a.get_text() for a in response.html.select("ul.templates a")]
    assert "hidden" not in [o["value"] for o in response.html.select("#filter-template option")]
    assert "Not for the API" not in response.text
    form = site.page("/templates/greet")
    assert site.page("/templates/hidden", status=404).content_type == "text/html"
    post_form(site, "/templates/hidden", {"page-token": page_token_of(form)}, status=404)
    assert job_count(site.database) == 0
    # a job of it (triggered while it was allowed) offers no way to run it again
    fill_jobs(site, "hidden", 1)
    page = site.page("/jobs/1")
    assert page.html.select_one("#run-again") is None
    assert not page.html.select('a[href^="/templates/hidden"]')


#
# One job: GET /jobs/<token>
#


def test_job_page_shows_the_job(site):
    token = site.trigger("greet", Name="Ann", Color="green", Password=SECRET)
    assert site.final(token) == "Warning"
    response = site.page(f"/jobs/{token}")
    assert response.headers["Content-Type"] == HTML
    html = response.html
    assert html.title.get_text() == f"Job {token} · Job server"
    assert text(html.select_one("#job-status")) == "Warning"
    assert "status-warning" in html.select_one("#job-status .status")["class"]
    facts = {text(dt): dd for dt, dd in zip(html.select(".facts dt"), html.select(".facts dd"))}
    assert text(facts["Template"]) == "greet" and facts["Template"].a["href"] == "/templates/greet"
    for fact in ("Triggered", "Started", "Ended"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", facts[fact].time["datetime"]), fact
    assert re.fullmatch(r"\d+\.\d s", text(facts["Ran for"]))
    assert variables_shown(response) == {"Name": "Ann", "Color": "green", "Password": "••••••"}
    assert SECRET not in response.text
    assert log_messages(response) == [("INFO", "hello Ann in green with ***"), ("WARN", "careful, Ann")]
    assert [li["class"] for li in html.select("#log li")] == [["entry", "level-info"], ["entry", "level-warn"]]
    assert html.select_one("#cancel-form") is None  # final: nothing to cancel
    # the raw log is the API's text
    raw = html.select_one("#raw-log")["href"]
    assert raw == f"/api/jobs/logs?token={token}"
    assert site.client.get(raw).text == "INFO: hello Ann in green with ***\nWARN: careful, Ann\n"


@pytest.mark.alone
def test_running_job_page_offers_cancel_and_is_live(site):
    token = site.trigger("wait", Label="live")
    site.wait_log(token, "started live")
    response = site.page(f"/jobs/{token}")
    html = response.html
    assert text(html.select_one("#job-status")) == "Executing"
    assert html.select_one("#job").get("data-final") == "false"
    assert html.select_one("#job-finished").get_text() == ""
    cancel = html.select_one("#cancel-form")
    assert cancel["method"] == "post" and cancel["action"] == f"/jobs/{token}/cancel"
    assert cancel.select_one("button").get_text() == "Cancel"
    # what the script polls: the state and the entries after an offset, answered at once (no long poll)
    started = time.monotonic()
    update = site.client.get(f"/jobs/{token}/updates?offset=1").json
    assert time.monotonic() - started < 1.0
    assert (update["status"], update["final"], update["count"], update["offset"]) == ("Executing", False, 1, 1)
    assert update["entries"] == []
    site.release(token)
    site.final(token)
    update = site.client.get(f"/jobs/{token}/updates?offset=0").json
    assert update["final"] is True and update["status"] == "Succeeded"
    assert update["entries"] == [[0, "INFO", "started live"], [1, "INFO", "released"]]
    assert site.page(f"/jobs/{token}").html.select_one("#cancel-form") is None


def test_pending_job_page_offers_cancel(site):
    running = site.trigger("single")
    site.wait_status(running, "Executing")
    pending = site.trigger("single")
    response = site.page(f"/jobs/{pending}")
    assert text(response.html.select_one("#job-status")) == "Pending"
    assert response.html.select_one("#job-started").get_text() == ""
    response = submit(response.forms["cancel-form"])
    assert response.status_int == 303 and response.headers["Location"].endswith(f"/jobs/{pending}")
    assert site.status(pending) == "Error"
    site.release(running)
    site.final(running)


def test_cancel_button_stops_a_running_job(site):
    token = site.trigger("wait")
    site.wait_log(token, "started")
    response = site.page(f"/jobs/{token}")
    done = submit(response.forms["cancel-form"])
    assert done.status_int == 303 and urllib.parse.urlsplit(done.headers["Location"]).path == f"/jobs/{token}"
    assert site.final(token) == "Error"
    page = done.follow()
    assert_page_headers(page)
    assert text(page.html.select_one("#job-status")) == "Error"
    assert "canceled" in " ".join(m for _, m in log_messages(page)).lower()


def test_cancel_needs_a_post_with_the_pages_token(site):
    token = site.trigger("wait")
    site.wait_log(token, "started")
    page_token = page_token_of(site.page(f"/jobs/{token}"))
    site.client.get(f"/jobs/{token}/cancel", status=405)  # nothing changes state on a GET
    post_form(site, f"/jobs/{token}/cancel", {}, status=403)
    post_form(site, f"/jobs/{token}/cancel", {"page-token": "1.0123456789abcdef0123456789abcdef"}, status=403)
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"}, {"Referer": "http://evil.example/x"}):
        post_form(site, f"/jobs/{token}/cancel", {"page-token": page_token}, status=403, headers=headers)
    assert site.status(token) == "Executing"
    post_form(site, f"/jobs/{token}/cancel", {"page-token": page_token}, status=303,
              headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"})
    assert site.final(token) == "Error"


def test_run_again_fills_the_form_but_not_secrets(site):
    token = site.trigger("greet", Name="Bea", Color="blue", Password=SECRET)
    site.final(token)
    again = site.page(f"/jobs/{token}").html.select_one("#run-again")
    assert again.get_text() == "Run again"
    url = urllib.parse.urlsplit(again["href"])
    assert url.path == "/templates/greet"
    assert dict(urllib.parse.parse_qsl(url.query)) == {"Name": "Bea", "Color": "blue"}
    form_page = site.page(again["href"])
    form = form_page.forms["run-form"]
    assert (form["Name"].value, form["Color"].value, form["Password"].value) == ("Bea", "blue", "")
    assert SECRET not in form_page.text


def test_run_again_of_a_keyed_job_carries_no_key(site):
    token = site.trigger("vault", key=KEY, Target="zebra", Password=SECRET)
    site.wait_log(token, "vault opened", key=KEY)
    response = unlocked_page(site, token)
    href = response.html.select_one("#run-again")["href"]
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(href).query)) == {"Target": "zebra"}
    assert KEY not in href and SECRET not in href
    form = site.page(href).forms["run-form"]
    assert form["Target"].value == "zebra" and form["key"].value == "" and form["Password"].value == ""
    site.release(token)


def test_run_again_keeps_added_variables(site):
    """A job of a template with allow_new_variables: its added variables are among "this job's values"."""
    token = site.trigger("echo", Text="one", Extra="two")
    site.final(token)
    href = site.page(f"/jobs/{token}").html.select_one("#run-again")["href"]
    form_page = site.page(href)
    rows = [(n["value"] if n.has_attr("value") else "", v["value"] if v.has_attr("value") else "")
            for n, v in zip(form_page.html.select('input[name="new-name"]'),
                            form_page.html.select('input[name="new-value"]'))]
    assert form_page.forms["run-form"]["Text"].value == "one"
    assert ("Extra", "two") in rows, f"Run again ({href}) lost the added variable: rows {rows}"


@pytest.mark.alone
def test_long_log_sends_only_its_end(site):
    """A million entries: the page carries the last 200, earlier ones come on demand, 500 at a time."""
    token = site.trigger("quick")
    site.final(token)
    count = 1_000_000
    started = time.perf_counter()
    with sqlite3.connect(site.database, timeout=10) as db:
        db.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?)"
                   " INSERT INTO logs (job_id, seq, level, message) SELECT ?, x, 'INFO', 'entry ' || x FROM c",
                   (count - 1, int(token)))
    db.close()
    filled = time.perf_counter() - started
    started = time.perf_counter()
    response = site.page(f"/jobs/{token}")
    took = time.perf_counter() - started
    print(f"\n1,000,000 log entries: filled in {filled:.2f} s, job page in {took * 1000:.0f} ms,"
          f" {len(response.body)} bytes")
    assert len(response.body) < 100_000
    entries = log_messages(response)
    assert len(entries) == 200 and entries[-1] == ("INFO", f"entry {count - 1}")
    assert entries[0] == ("INFO", f"entry {count - 200}")
    assert response.html.select_one("#log")["start"] == str(count - 200 + 1)
    earlier = response.html.select_one("#log-earlier")
    assert not earlier.has_attr("hidden") and f"{count - 200} earlier entries" in text(earlier)
    assert response.html.select_one("#raw-log")["href"] == f"/api/jobs/logs?token={token}"
    update = site.client.get(f"/jobs/{token}/updates?before={count - 200}").json
    assert [e[0] for e in update["entries"]] == list(range(count - 700, count - 200))
    assert update["entries"][0][2] == f"entry {count - 700}"
    update = site.client.get(f"/jobs/{token}/updates?offset=0").json
    assert len(update["entries"]) == 500 and update["offset"] == 500 and update["count"] == count
    assert took < 1.0


#
# A template's form: GET and POST /templates/<name>
#


def labels_of(html) -> dict[str, str]:
    return {label["for"]: text(label) for label in html.select("label[for]")}


def test_form_has_an_input_per_variable(site):
    response = site.page("/templates/greet")
    html = response.html
    assert html.title.get_text() == "Run greet · Job server"
    assert text(html.select_one(".description")) == "Says hello to <b>someone</b> & nobody else"
    form = html.select_one("form#run-form")
    assert form["method"] == "post" and form["action"] == "/templates/greet"
    fields = form.select("input:not([type=hidden]), select, textarea")
    assert [f["name"] for f in fields] == ["Name", "Color", "Password"]
    name, color, password = fields
    assert (name.name, name["type"], name["value"], name["pattern"]) == ("input", "text", "world", "[A-Za-z]+")
    assert name.has_attr("required") and not color.has_attr("required")
    assert color.name == "select"
    assert [o["value"] for o in color.select("option") if o["value"]] == ["red", "green", "blue"]
    assert color.select_one("option[selected]")["value"] == "red"
    assert password["type"] == "password" and not password.has_attr("value")
    assert password.get("autocomplete") == "off"
    labels = labels_of(html)
    for field in fields:  # a label each, and its description as help
        assert labels[field["id"]].startswith(field["name"])
        help_ids = field["aria-describedby"].split()
        assert any(html.find(id=h) is not None for h in help_ids)
    help_texts = {f["name"]: text(html.find(id=f"help-{f['name']}")) for f in fields}
    assert help_texts["Name"].startswith("Who to <i>greet</i>") and "[A-Za-z]+" in help_texts["Name"]
    assert help_texts["Color"] == "A colour to say it in"
    assert "Only the job sees it" in help_texts["Password"]
    assert "<i>greet</i>" not in response.text
    assert html.select_one('input[name="key"]') is None  # no key, no key input
    assert html.select_one('input[name="new-name"]') is None  # no allow_new_variables


def test_form_of_a_keyed_template_asks_for_the_key(site):
    html = site.page("/templates/vault").html
    key = html.select_one('input[name="key"]')
    assert key["type"] == "password" and key.has_attr("required") and not key.has_attr("value")
    assert labels_of(html)[key["id"]] == "Key"


def test_form_adds_rows_when_new_variables_are_allowed(site):
    html = site.page("/templates/echo").html
    names, values = html.select('input[name="new-name"]'), html.select('input[name="new-value"]')
    assert len(names) == len(values) >= 1
    labels = labels_of(html)
    assert all(labels[i["id"]] in ("Name", "Value") for i in names + values)
    assert html.select_one("#add-variable") is not None  # the script shows it


def test_form_creates_the_job_and_goes_to_its_page(site):
    form = site.page("/templates/greet").forms["run-form"]
    form["Name"] = "Cy"
    form["Color"] = "green"
    form["Password"] = SECRET
    response = submit(form)
    assert response.status_int == 303
    location = urllib.parse.urlsplit(response.headers["Location"])
    token = re.fullmatch(r"/jobs/(\d+)", location.path).group(1)
    assert not location.query
    assert site.final(token) == "Warning"
    page = response.follow()
    assert log_messages(page)[0] == ("INFO", "hello Cy in green with ***")
    assert query(site.database, "SELECT variables FROM jobs WHERE id = ?", int(token))[0][0] == json.dumps(
        {"Name": "Cy", "Color": "green", "Password": None})


def test_empty_fields_keep_the_defaults(site):
    form = site.page("/templates/greet").forms["run-form"]
    form["Name"] = ""
    form["Color"] = ""
    token = submit(form).headers["Location"].rsplit("/", 1)[1]
    site.final(token)
    assert variables_shown(site.page(f"/jobs/{token}"))["Name"] == "world"


def test_added_rows_become_variables(site):
    form = site.page("/templates/echo").forms["run-form"]
    form.set("new-name", "Extra", index=0)
    form.set("new-value", "added value", index=0)
    token = submit(form).headers["Location"].rsplit("/", 1)[1]
    site.final(token)
    assert variables_shown(site.page(f"/jobs/{token}"))["Extra"] == "added value"


def api_refusal(site, template, status=400, **variables) -> str:
    response = site.client.get("/api/jobs/trigger", {"template": template, **variables}, status=status)
    return response.text


@pytest.mark.parametrize("field, value, template", [
    ("Name", "not a name", "greet"),   # pattern
    ("Color", "purple", "greet"),      # choices
    ("Target", "", "needed"),          # required, no default (an empty field keeps the default, as if not given)
])
def test_refused_value_shows_the_apis_reason_next_to_its_field(site, field, value, template):
    reason = api_refusal(site, template, **({field: value} if value else {}))
    form_page = site.page(f"/templates/{template}")
    fields = {"page-token": page_token_of(form_page), field: value}
    if template == "greet":
        fields.update(Name=fields.get("Name", "Dee"), Password=SECRET)
        fields.setdefault("Color", "blue")
    response = post_form(site, f"/templates/{template}", fields)
    assert_page_headers(response, status=400)
    assert response.content_type == "text/html"
    assert problems(response) == {f"problem-{field}": reason}
    problem = response.html.find(id=f"problem-{field}")
    assert problem.find_parent(class_="field").select_one(f'[name="{field}"]') is not None  # next to it
    assert f"var-{field}" in [i["id"] for i in problem.find_parent(class_="field").select("input, select")]
    assert job_count(site.database) == 0
    if template == "greet":  # the other values kept, the secret not sent back
        again = response.forms["run-form"]
        assert again["Password"].value == "" and SECRET not in response.text
        if field != "Name":
            assert again["Name"].value == "Dee"
        if field != "Color":
            assert again["Color"].value == "blue"


def test_refused_added_variable_shows_the_apis_reason(site):
    reason = api_refusal(site, "echo", LD_PRELOAD="/tmp/x.so")
    form = site.page("/templates/echo").forms["run-form"]
    form["Text"] = "kept"
    form.set("new-name", "LD_PRELOAD", index=0)
    form.set("new-value", "/tmp/x.so", index=0)
    response = submit(form)
    assert response.status_int == 400 and job_count(site.database) == 0
    assert response.forms["run-form"]["Text"].value == "kept"
    assert reason in problems(response).values(), (
        f"the API's reason {reason!r} is not on the page; its problems: {problems(response)}")


def test_too_long_value_is_refused_next_to_its_field(site):
    long = "a" * 9000
    reason = api_refusal(site, "greet", Name=long)
    form = site.page("/templates/greet").forms["run-form"]
    form["Name"] = long
    form["Color"] = "green"
    response = submit(form)
    assert response.status_int == 400 and job_count(site.database) == 0
    assert response.content_type == "text/html", f"a {response.content_type} page: {response.text[:200]!r}"
    assert reason in problems(response).values()
    assert response.forms["run-form"]["Color"].value == "green"


def test_keyed_form_needs_the_key(site):
    reason = site.client.get("/api/jobs/trigger", {"template": "vault"}, status=403).text
    wrong = site.client.get("/api/jobs/trigger", {"template": "vault", "key": "nope"}, status=403).text
    for key, expected in (("", reason), ("nope", wrong)):
        form = site.page("/templates/vault").forms["run-form"]
        form["Target"] = "kept"
        form["Password"] = SECRET
        form["key"] = key
        response = submit(form)
        assert_page_headers(response, status=403)
        assert problems(response) == {"problem-key": expected}
        assert response.forms["run-form"]["Target"].value == "kept"
        assert response.forms["run-form"]["key"].value == "" and response.forms["run-form"]["Password"].value == ""
        assert SECRET not in response.text and (not key or key not in response.text)
    assert job_count(site.database) == 0
    form = site.page("/templates/vault").forms["run-form"]
    form["key"] = KEY
    response = submit(form)
    assert response.status_int == 303 and KEY not in response.headers["Location"]
    site.release(response.headers["Location"].rsplit("/", 1)[1])


#
# Keys: the pages never show what the API would refuse.
#


def test_keyed_job_shows_nothing_protected_without_the_key(site, caplog):
    caplog.set_level(logging.DEBUG)
    token = site.trigger("vault", key=KEY, Target="zebra", Password=SECRET)
    site.wait_log(token, "vault opened", key=KEY)
    response = site.page(f"/jobs/{token}", status=403)
    html = response.html
    assert text(html.select_one("#job-status")) == "key needed"
    assert "Executing" not in response.text and "zebra" not in response.text and "vault opened" not in response.text
    assert log_messages(response) == [] and variables_shown(response) == {}
    assert html.select_one("#job-started").get_text() == "" and html.select_one("#job-duration").get_text() == ""
    assert html.select_one("#job-details").has_attr("hidden")
    assert f"Job {token}" in text(html.h1) and "vault" in text(html.h1) and html.select_one(".facts time")
    # the key in a URL is not taken
    site.page(f"/jobs/{token}?key={KEY}", status=403)
    for headers in ({}, {"X-ApiKey": "wrong"}):
        site.client.get(f"/jobs/{token}/updates?offset=0", headers=headers, status=403)
    assert site.client.get(f"/jobs/{token}/updates?offset=0&key={KEY}", status=403)
    update = site.client.get(f"/jobs/{token}/updates?offset=0", headers={"X-ApiKey": KEY}).json
    assert update["status"] == "Executing" and update["entries"][0][2] == "vault opened for zebra"
    # the key form (no JavaScript): a wrong key shows why and nothing more, the right one the job
    locked = site.page(f"/jobs/{token}", status=403)
    form = locked.forms["key-form"]
    form["key"] = "wrong"
    refused = submit(form)
    assert_page_headers(refused, status=403)
    assert "zebra" not in refused.text and "vault opened" not in refused.text
    assert text(refused.html.select_one(".problem")) == site.client.get(
        "/api/jobs/status", {"token": token, "key": "wrong"}, status=403).text
    shown = unlocked_page(site, token)
    assert shown.status_int == 200
    assert text(shown.html.select_one("#job-status")) == "Executing"
    assert variables_shown(shown) == {"Target": "zebra", "Password": "••••••"}
    assert log_messages(shown) == [("INFO", "vault opened for zebra")]
    for response in (locked, refused, shown):  # the key is never sent back
        assert KEY not in response.text and SECRET not in response.text
        assert not any(KEY in value for _, value in response.headerlist)
    site.release(token)
    site.final(token, key=KEY)
    # nor kept anywhere: the database, the operator's log
    for path in Path(site.database).parent.glob(Path(site.database).name + "*"):
        assert KEY.encode() not in path.read_bytes(), path
    assert not [r for r in caplog.records if KEY in r.getMessage() or KEY in json.dumps(
        getattr(r, "fields", {}), default=str)]


def test_locked_page_is_the_same_whatever_the_jobs_status(site):
    """Without the key, a running keyed job's page and a finished one's differ in nothing but their token
    and times: not even a Cancel form hidden in the HTML tells that it runs."""
    running = site.trigger("vault", key=KEY)
    site.wait_log(running, "vault opened", key=KEY)
    finished = site.trigger("vault", key=KEY)
    site.release(finished)
    site.final(finished, key=KEY)

    def shape(token):
        response = site.page(f"/jobs/{token}", status=403)
        return sorted(f"{tag.name}#{tag.get('id')}[{tag.get('name')}]" for tag in response.html.find_all(True))

    running_shape, finished_shape = shape(running), shape(finished)
    only_running = sorted(set(running_shape) - set(finished_shape))
    assert running_shape == finished_shape, f"only on the running job's locked page: {only_running}"
    site.release(running)


def test_keyed_jobs_listed_with_token_template_and_time_only(site):
    token = site.trigger("vault", key=KEY, Target="zebra")
    site.release(token)
    assert site.final(token, key=KEY) == "Succeeded"
    plain = site.trigger("quick")
    site.final(plain)
    response = site.page("/")
    row = next(r for r in job_rows(response) if r["token"] == token)
    assert row["template"] == "vault" and row["href"] == f"/jobs/{token}" and row["datetime"]
    assert row["status"] == "key needed" and row["duration"] == ""
    keyed_row = next(tr for tr in response.html.select("table.jobs tbody tr") if tr.a.get_text() == token)
    assert "Succeeded" not in str(keyed_row) and "status-succeeded" not in str(keyed_row)
    # a status filter leaves keyed jobs out: a filtered list would tell their status
    for query_string in ("status=Succeeded", "template=vault&status=Succeeded"):
        tokens = [r["token"] for r in job_rows(site.page(f"/?{query_string}"))]
        assert token not in tokens
    assert [r["token"] for r in job_rows(site.page("/?status=Succeeded"))] == [plain]
    assert [r["token"] for r in job_rows(site.page("/?template=vault"))] == [token]


#
# Built like the rest of the server.
#


def test_unknown_paths_outside_the_api_get_an_html_404(site):
    for path in ("/nope", "/jobs/999999", "/jobs/abc", "/jobs/1/nope", "/templates/nope", "/templates/",
                 "/jobs/99999999999999999999999", "/static/nope.js", "/index.html"):
        response = site.client.get(path, status=404)
        assert response.headers["Content-Type"] == HTML, path
        assert_page_headers(response)
        assert text(response.html.h1) == "Not found"
    site.client.get("/jobs/999999/updates?offset=0", status=404)
    api = site.client.get("/api/nope", status=404)
    assert api.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_every_page_carries_the_security_headers(site):
    token = site.trigger("greet")
    site.final(token)
    keyed = site.trigger("vault", key=KEY)
    pages = {"/": 200, "/?status=Error": 200, f"/jobs/{token}": 200, f"/jobs/{keyed}": 403,
             "/templates/greet": 200, "/templates/vault": 200, "/nope": 404, "/templates/nope": 404}
    for path, status in pages.items():
        response = site.client.get(path, status=status)
        assert_page_headers(response)
        assert response.headers["Content-Type"] == HTML
    form = site.page("/templates/greet").forms["run-form"]
    form["Name"] = "1"
    assert_page_headers(submit(form), status=400)
    update = site.client.get(f"/jobs/{token}/updates?offset=0")
    assert update.headers["Content-Type"] == "application/json"  # never taken for HTML (with nosniff)
    assert_page_headers(update)
    site.release(keyed)


def page_html(site) -> dict[str, str]:
    token = site.trigger("greet", Name="Eve")
    site.final(token)
    keyed = site.trigger("vault", key=KEY)
    refused = site.page("/templates/greet").forms["run-form"]
    refused["Name"] = "0"
    responses = {
        "list": site.page("/"), "job": site.page(f"/jobs/{token}"), "locked": site.page(f"/jobs/{keyed}", 403),
        "unlocked": unlocked_page(site, keyed), "form": site.page("/templates/greet"),
        "keyed form": site.page("/templates/vault"), "new variables": site.page("/templates/echo"),
        "refused": submit(refused), "404": site.page("/nope", 404),
    }
    site.release(keyed)
    return responses


def test_no_inline_script_or_style_and_nothing_from_elsewhere(site):
    for name, response in page_html(site).items():
        html = response.html
        scripts = html.find_all("script")
        assert [s.get("src") for s in scripts] == ["/static/page.js"], name
        assert all(not s.string for s in scripts), name
        assert html.find("style") is None, name
        for tag in html.find_all(True):
            assert "style" not in tag.attrs, (name, tag)
            assert not [a for a in tag.attrs if a.lower().startswith("on")], (name, tag)
            for attribute in ("href", "src", "action", "formaction", "poster", "srcset", "data"):
                value = tag.get(attribute)
                if value is not None:
                    assert value.startswith(("/", "#")) and not value.startswith("//"), (name, tag)
        stylesheets = [link["href"] for link in html.find_all("link", rel="stylesheet")]
        assert stylesheets == ["/static/page.css"], name
    css = site.client.get("/static/page.css")
    assert css.content_type == "text/css"
    assert not re.search(r"@import|@font-face|url\(", css.text), "the stylesheet fetches something"
    js = site.client.get("/static/page.js")
    assert js.content_type in ("text/javascript", "application/javascript")
    assert len(js.body) < 20_000, "one small script"
    assert not re.search(r"https?://|\beval\(|innerHTML|outerHTML|insertAdjacentHTML|document\.write|new Function",
                         js.text)
    assert "X-Content-Type-Options" in js.headers


def test_same_origin_post_with_explicit_default_port(site):
    """Host: localhost:80 and Referer: http://localhost/... name the same origin (80 is http's default)."""
    form = site.page("/templates/greet").forms["run-form"]
    response = form.submit(status="*", extra_environ={"HTTP_HOST": "localhost:80"},
                           headers={"Referer": "http://localhost/templates/greet"})
    assert response.status_int == 303, response.text


def test_page_posts_need_the_pages_token_and_the_same_origin(site):
    form_page = site.page("/templates/greet")
    page_token = page_token_of(form_page)
    fields = {"Name": "Mallory", "page-token": page_token}
    for headers in ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
                    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"},
                    {"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Referer": "http://127.0.0.1.evil.example/form"}):
        post_form(site, "/templates/greet", fields, status=403, headers=headers)
    # no token, someone else's, or a stale one of ours
    stale_stamp = str(int(time.time()) - 86400 - 60)
    secret = site.app.extensions["jobserver"].page_secret
    stale = f"{stale_stamp}.{hmac.new(secret, stale_stamp.encode(), hashlib.sha256).hexdigest()[:32]}"
    forged = f"{int(time.time())}.{'0' * 32}"
    for bad in ({"Name": "Mallory"}, {**fields, "page-token": forged}, {**fields, "page-token": stale}):
        response = post_form(site, "/templates/greet", bad, status=403)
        assert "form" in response.text.lower()
    assert job_count(site.database) == 0
    response = post_form(site, "/templates/greet", fields, status=303,
                         headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"})
    assert job_count(site.database) == 1
    site.final(response.headers["Location"].rsplit("/", 1)[1])
    # the key form of a job page follows the same rules
    keyed = site.trigger("vault", key=KEY)
    post_form(site, f"/jobs/{keyed}", {"key": KEY, "page-token": page_token}, status=403,
              headers={"Sec-Fetch-Site": "cross-site"})
    post_form(site, f"/jobs/{keyed}", {"key": KEY}, status=403)
    site.release(keyed)


def test_nothing_changes_state_on_a_get(site):
    site.page("/templates/greet?Name=Getter&page-token=x")
    site.page("/")
    assert job_count(site.database) == 0
    token = site.trigger("wait")
    site.wait_log(token, "started")
    site.client.get(f"/jobs/{token}/cancel", status=405)
    site.client.head(f"/jobs/{token}/cancel", status=405)
    site.page(f"/jobs/{token}")
    site.client.get(f"/jobs/{token}/updates?offset=0")
    assert site.status(token) == "Executing" and job_count(site.database) == 1
    site.release(token)
    site.final(token)


def test_what_requests_and_processes_send_is_shown_as_text(site):
    variables = {f"P{i:02d}": payload for i, payload in enumerate(PAYLOADS)}
    token = site.trigger("echo", Text=PAYLOADS[0], **variables)
    assert site.final(token) == "Succeeded"
    response = site.page(f"/jobs/{token}")
    assert [m for _, m in log_messages(response)] == [PAYLOADS[0], *PAYLOADS]
    assert variables_shown(response) == {"Text": PAYLOADS[0], **variables}
    assert_no_payload_markup(response)
    # the Run again form carries the values as values
    form_page = site.page(f"/templates/echo?Text={urllib.parse.quote(PAYLOADS[1])}")
    assert form_page.forms["run-form"]["Text"].value == PAYLOADS[1]
    assert_no_payload_markup(form_page)
    for payload in PAYLOADS:
        again = site.page("/templates/echo?" + urllib.parse.urlencode({"Text": payload}))
        assert again.html.select_one("#var-Text")["value"] == payload
        assert_no_payload_markup(again)


def assert_no_payload_markup(response):
    html = response.html
    assert len(html.find_all("script")) == 1 and html.title.get_text().endswith("· Job server")
    for name in ("img", "svg", "iframe", "object", "embed", "video", "audio", "math", "style", "base", "meta",
                 "details", "noscript", "textarea", "marquee"):
        found = html.find_all(name)
        if name == "meta":
            assert [m.get("charset") or m.get("name") for m in found] == ["utf-8", "viewport", "color-scheme"]
        else:
            assert not found, (name, found)
    assert len(html.find_all("form")) <= 3 and len(html.find_all("body")) == 1
    assert not html.find_all(id=["pwn", "pwnbutton"])
    assert not [tag for tag in html.find_all(True) if any(a.startswith("on") for a in tag.attrs)]
    for payload in PAYLOADS:
        if "<" in payload:
            assert payload not in response.text
    assert "49" not in [t.strip() for t in html.strings]  # {{7*7}} was not evaluated


def test_descriptions_are_text(site, make_app, tmp_path):
    client = make_app(f"""
        [odd]
        description = '{PAYLOADS[1]} {PAYLOADS[4]}'
        [odd.variables]
        Thing = {{ default = '{PAYLOADS[3]}', description = '{PAYLOADS[5]}' }}
        [[odd.steps]]
        log = "x"
        """)
    client.extra_environ["HTTP_HOST"] = "localhost"
    listing = client.get("/")
    assert f"odd: {PAYLOADS[1]} {PAYLOADS[4]}" in text(listing.html.select_one("ul.templates"))
    assert_no_payload_markup(listing)
    form = client.get("/templates/odd")
    assert form.html.select_one("#var-Thing")["value"] == PAYLOADS[3]
    assert text(form.html.find(id="help-Thing")) == PAYLOADS[5]
    assert_no_payload_markup(form)


def test_pages_for_people(site):
    """Labels on every input, status as a word, a phone's viewport, a dark theme, times the script can
    show in the browser's zone (the browser test checks what it makes of them)."""
    css = site.client.get("/static/page.css").text
    assert "@media (prefers-color-scheme: dark)" in css
    for name, response in page_html(site).items():
        html = response.html
        assert html.html["lang"] == "en"
        assert html.select_one('meta[name="viewport"]')["content"] == "width=device-width, initial-scale=1"
        assert html.select_one('meta[name="color-scheme"]')["content"] == "light dark"
        labels = labels_of(html)
        for field in html.select("input, select, textarea"):
            if field.get("type") == "hidden":
                continue
            assert field.get("id") in labels or field.get("aria-label"), (name, field)
        for word in html.select(".status"):
            assert text(word), (name, word)  # a word, not only a colour
        for moment in html.select("time"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", moment["datetime"])
        assert html.select_one("a.skip")["href"] == "#main" and html.find(id="main") is not None


#
# 100,000 jobs.
#


def test_pages_at_100000_jobs(site):
    started = time.perf_counter()
    fill_jobs(site, "quick", 50_000, start=time.time() - 200_000)
    fill_jobs(site, "vault", 40_000, status_of="'Succeeded'", start=time.time() - 150_000)
    fill_jobs(site, "greet", 10_000, start=time.time() - 100_000)
    assert job_count(site.database) == 100_000
    print(f"\n100,000 jobs filled in {time.perf_counter() - started:.2f} s")
    timings = {}

    def timed(path, status=200):
        began = time.perf_counter()
        response = site.page(path, status=status)
        timings[path] = time.perf_counter() - began
        return response

    first = timed("/")
    rows = job_rows(first)
    assert len(rows) == 50 and rows[0]["token"] == "100000" and older_link(first) == "/?before=99951"
    middle = timed("/?before=70001")
    assert [r["token"] for r in job_rows(middle)][:2] == ["70000", "69999"] and len(job_rows(middle)) == 50
    assert all(r["status"] == "key needed" for r in job_rows(middle))  # vault's jobs
    deep = timed("/?before=30")
    assert len(job_rows(deep)) == 29 and older_link(deep) is None
    by_template = timed("/?template=quick")
    assert len(job_rows(by_template)) == 50 and {r["template"] for r in job_rows(by_template)} == {"quick"}
    assert job_rows(by_template)[0]["token"] == "50000"
    by_status = timed("/?status=Error")
    assert len(job_rows(by_status)) == 50 and {r["status"] for r in job_rows(by_status)} == {"Error"}
    keyed_by_status = timed("/?template=vault&status=Succeeded")  # leaves all 40,000 keyed jobs out
    assert job_rows(keyed_by_status) == []
    old_by_status = timed("/?status=Warning&before=60000")
    assert {r["template"] for r in job_rows(old_by_status)} == {"quick"} and len(job_rows(old_by_status)) == 50
    job = timed("/jobs/95000")
    assert text(job.html.select_one("#job-status")) in FINAL
    timed("/jobs/60000", status=403)
    timed("/templates/greet")
    print("\n".join(f"  {path}: {seconds * 1000:.0f} ms" for path, seconds in timings.items()))
    slow = {path: seconds for path, seconds in timings.items() if seconds > 1.0}
    assert not slow, slow


def test_readme_has_a_web_page_section_with_screenshots():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Web page\n(.*?)(?=^## |\Z)", readme, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Web page' section"
    images = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", section.group(1))
    assert {"docs/jobs.png", "docs/job.png"} <= set(images), images
    for image in images:
        assert (ROOT / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


#
# What an adversarial review reproduced against a real server, each fixed.
#

def test_variables_named_like_url_for_arguments_keep_the_job_page_working(make_app):
    """A variable called name, endpoint, _method or _anchor once made every page of its jobs a 500: the
    Run again link was built by url_for, whose own keyword arguments they are."""
    client = make_app('[open]\nallow_new_variables = true\n[open.variables]\nname = "world"\n'
                      '[[open.steps]]\nlog = "hi $name"\n')
    client.extra_environ["HTTP_HOST"] = "localhost"
    token = client.get("/api/jobs/trigger", {"template": "open", "endpoint": "x", "_method": "DELETE",
                                             "_anchor": "frag"}).text
    client.get("/api/jobs/status", {"token": token, "wait": 10})
    response = client.get(f"/jobs/{token}")
    again = urllib.parse.urlsplit(response.html.select_one("#run-again")["href"])
    assert again.path == "/templates/open" and not again.fragment
    assert dict(urllib.parse.parse_qsl(again.query)) == {"name": "world", "endpoint": "x", "_method": "DELETE",
                                                         "_anchor": "frag"}


def test_a_locked_page_is_the_same_for_a_long_log(make_app):
    """A locked page once showed where its log's last 200 entries began: how long the log was."""
    client = make_app('[big]\nkey = "k"\n[[big.steps]]\nrun = "seq 1 600"\n[small]\nkey = "k"\n'
                      '[[small.steps]]\nlog = "one"\n')
    client.extra_environ["HTTP_HOST"] = "localhost"
    tokens = [client.get("/api/jobs/trigger", {"template": name, "key": "k"}).text for name in ("big", "small")]
    for token in tokens:
        client.get("/api/jobs/status", {"token": token, "key": "k", "wait": 10})

    def locked(token):
        html = client.get(f"/jobs/{token}", status=403).text
        return re.sub(r"[0-9]{10}\.[0-9a-f]+|Job [0-9]+|/jobs/[0-9]+|data-token=\"[0-9]+\"|"
                      r"\"token\" value=\"[0-9]+\"|<time[^>]*>[^<]*</time>|big|small", "", html)

    assert locked(tokens[0]) == locked(tokens[1])


def test_a_secret_given_as_an_added_row_with_a_dollar_is_not_sent_back(make_app):
    client = make_app('[open]\nallow_new_variables = true\n[open.variables]\nTarget = { pattern = "[a-z]+" }\n'
                      'Password = { secret = true, default = "" }\n[[open.steps]]\nlog = "x"\n')
    client.extra_environ["HTTP_HOST"] = "localhost"
    form = client.get("/templates/open").forms["run-form"]
    form["Target"] = "BAD!"
    form.fields["new-name"][0].value = "$Password"
    form.fields["new-value"][0].value = "TOPSECRET2"
    response = form.submit(status=400)
    assert "TOPSECRET2" not in response.text and "does not match the pattern" in response.text


def test_no_browser_hint_for_patterns_whose_classes_differ_in_a_browser():
    import app as server_module

    assert server_module.html_pattern(r"\w+") is None and server_module.html_pattern(r"\d{2}") is None
    assert server_module.html_pattern("[a-z0-9.-]+") == r"[a-z0-9\.\-]+"


def test_the_key_throttle_on_a_form_is_said_next_to_the_key(make_app):
    client = make_app('[locked]\nkey = "right"\n[locked.variables]\nN = ""\n[[locked.steps]]\nlog = "x"\n',
                      KEY_FAILURES=2)
    client.extra_environ["HTTP_HOST"] = "localhost"
    for _ in range(3):
        client.get("/api/jobs/trigger", {"template": "locked", "key": "wrong"}, status=403)
    form = client.get("/templates/locked").forms["run-form"]
    form["N"], form["key"] = "77", "right"
    response = form.submit(status=429)
    assert response.headers["Retry-After"] and "Too many wrong keys" in text(response.html.select_one("#problem-key"))
    assert response.html.select_one("#var-N")["value"] == "77" and "right" not in response.text


def test_a_template_whose_name_has_a_slash_is_runnable_from_the_page(make_app):
    client = make_app('["db/backup"]\n[["db/backup".steps]]\nlog = "backed up"\n')
    client.extra_environ["HTTP_HOST"] = "localhost"
    link = client.get("/").html.select_one("ul.templates a")["href"]
    assert link == "/templates/db%2Fbackup"
    form = client.get(link).forms["run-form"]
    assert form.submit(status=303).headers["Location"].startswith("/jobs/")

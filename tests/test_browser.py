"""The web page in a real headless Chromium, driven by Selenium, against a real `python app.py` on loopback.

One browser and one server for the module (a browser starts in ~0.8 s); each test opens what it needs and
leaves one tab behind. Every test that uses the browser ends with no Content-Security-Policy violation in its
console. Jobs that must be caught while they run wait for a gate file the test creates: no fixed sleeps. The
page script's timers run five times faster than a person's (FAST_TIMERS), except in the test of a form run at
the real pace and in the test of the polling itself, which records the delays the script asks for.

UPDATE_SCREENSHOTS=1 writes the README's screenshots to docs/; otherwise they go to a temporary folder (they
are taken either way, so that code path runs)."""

import contextlib
import datetime
import http.server
import itertools
import os
import re
import sqlite3
import statistics
import threading
import time
import urllib.parse
import zoneinfo
from pathlib import Path

import browser
import pytest
from conftest import ROOT, ServerProcess, require, wait_for
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from test_pages import PAYLOADS

KEY = "browser-key-5b2e9a"
SECRET = "s3cret-never-on-screen"
FINAL = ("Succeeded", "Warning", "Error")
WIDE, HIGH = 1280, 900

TEMPLATES = """
[stages]
description = "Prints a line, then more in two stages, each after its gate"
timeout = 60

[stages.variables]
Lines = { default = "3", pattern = '[0-9]{1,3}', description = "Lines in stages 2 and 3" }
Mode = { default = "calm", choices = ["calm", "loud"] }

[[stages.steps]]
run = '''
echo "stage 1 ($Mode)"
until [ -e "GATES/$JobToken.1" ] || [ -e GATES/all ]; do sleep 0.02; done
for stage in 2 3; do
  i=1; while [ $i -le $Lines ]; do echo "stage $stage line $i"; i=$((i+1)); done
  until [ -e "GATES/$JobToken.$stage" ] || [ -e GATES/all ]; do sleep 0.02; done
done
echo "all stages done" >&2
'''

[pick]
description = "A form with every kind of field"

[pick.variables]
Target = { pattern = '[a-z]+', required = true, description = "Lower-case letters only" }
Mode = { default = "fast", choices = ["fast", "slow"], description = "How to run" }
Password = { secret = true, description = "Masked in the log" }

[[pick.steps]]
run = 'echo "picked $Target $Mode $Password"'

[hosts]
description = "The patterns of templates.toml's own examples"

[hosts.variables]
Server = { default = "", pattern = '[A-Za-z0-9][A-Za-z0-9.-]*' }
Mail = { default = "", pattern = '[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+' }
Word = { default = "", pattern = '[a-z]+' }

[[hosts.steps]]
log = "$Server $Mail $Word"

[vault]
description = "Needs its key"
key = "KEY"
allow_new_variables = true

[vault.variables]
Target = "alpha"
Password = { secret = true, default = "" }

[[vault.steps]]
run = 'echo "vault opened for $Target"; until [ -e "GATES/$JobToken.1" ] || [ -e GATES/all ]; do sleep 0.02; done; echo "vault closed"'

[echo]
description = "Prints its text"
allow_new_variables = true

[echo.variables]
Text = { default = "", description = "Any text" }

[[echo.steps]]
run = '''printf '%s\\n' "$Text"'''

[inject]
description = "Prints what a hostile process might"
allow_new_variables = true

[[inject.steps]]
run = 'echo ready; until [ -e "GATES/$JobToken.1" ] || [ -e GATES/all ]; do sleep 0.02; done; cat GATES/payloads.txt'

[sleeper]
description = "Sleeps until canceled"

[[sleeper.steps]]
run = 'echo "sleeping"; echo $$ > "GATES/$JobToken.pid"; exec sleep 60'

[quick]
[[quick.steps]]
log = "quick"
""".replace("KEY", KEY)


#
# The module's browser, server and attacker.
#


class Site:
    """The module's real server, its gates, and requests of the test's own (not the browser's)."""

    def __init__(self, server: ServerProcess, gates: Path):
        self.server, self.gates = server, gates
        self.base = f"http://127.0.0.1:{server.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def api(self, path, status=200, method="GET", **params) -> str:
        if method == "POST":
            got, body, _ = self.server.request("POST", path, body=list(params.items()))
        else:
            got, body, _ = self.server.request("GET", path, params)
        assert got == status, (path, got, body)
        return body

    def trigger(self, template, key=None, **variables) -> str:
        return self.api("/api/jobs/trigger", method="POST", template=template, **({"key": key} if key else {}),
                        **variables)

    def status(self, token, key=None) -> str:
        return self.api("/api/jobs/status", token=token, **({"key": key} if key else {}))

    def final(self, token, key=None) -> str:
        status = self.api("/api/jobs/status", token=token, wait=30, **({"key": key} if key else {}))
        assert status in FINAL, f"job {token} still {status}"
        return status

    def logs(self, token, key=None) -> str:
        return self.api("/api/jobs/logs", token=token, **({"key": key} if key else {}))

    def wait_log(self, token, text, key=None, timeout=10):
        wait_for(lambda: text in self.logs(token, key), timeout, what=f"job {token} to log {text!r}")

    def release(self, token, stage=1):
        (self.gates / f"{token}.{stage}").touch()

    def job_count(self) -> int:
        with contextlib.closing(sqlite3.connect(self.server.db, timeout=10)) as db:
            return db.execute("SELECT count(*) FROM jobs").fetchone()[0]

    def newest_token(self) -> str:
        with contextlib.closing(sqlite3.connect(self.server.db, timeout=10)) as db:
            return str(db.execute("SELECT max(id) FROM jobs").fetchone()[0])


def start_server(directory: Path, templates: str) -> ServerProcess:
    directory.mkdir(parents=True, exist_ok=True)
    return ServerProcess(directory, templates, "--grace", "0.5", "--cancel-grace", "1", "--max-followers", "32",
                         db=directory / "jobs.db").start()


def stop_server(server: ServerProcess, gates: Path | None = None) -> None:
    if gates is not None:
        (gates / "all").touch()
    if server.process is not None and server.process.poll() is None:
        server.stop(timeout=30)


@pytest.fixture(scope="module")
def driver():
    if browser.find_chromium() is None:
        require(browser.MISSING_CHROMIUM)
    d = browser.start_browser(WIDE, HIGH)
    fast_timers(d)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser-server")
    gates = directory / "gates"
    gates.mkdir()
    server = start_server(directory, TEMPLATES.replace("GATES", str(gates)))
    try:
        yield Site(server, gates)
    finally:
        stop_server(server, gates)


@pytest.fixture(autouse=True)
def clean_browser(request):
    """Each browser test starts on one tab at the full width, with an empty console, and ends with no CSP
    violation logged."""
    if "driver" not in request.fixturenames:
        yield
        return
    d = request.getfixturevalue("driver")
    browser.set_viewport(d, WIDE, HIGH)
    browser.clear_browser_log(d)
    yield
    violations = browser.csp_violations(d)
    handles = d.window_handles
    for handle in handles[1:]:
        d.switch_to.window(handle)
        d.close()
    d.switch_to.window(handles[0])
    d.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
    assert not violations, [v["message"] for v in violations]


# The script's timers, five times shorter (500 ms polls take 100 ms), so that the tests need not wait as long
# as a person would; test_form_to_live_log_to_final_status runs at the real pace, and
# test_live_updates_back_off_pause_while_hidden_and_stop_when_final records the delays the script asks for.
FAST_TIMERS = """
  const original = window.setTimeout.bind(window);
  window.setTimeout = (callback, delay, ...rest) => original(callback, delay >= 100 ? delay / 5 : delay, ...rest);
"""


def fast_timers(d) -> None:
    """Shorten the timers of every page this tab loads from now on."""
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FAST_TIMERS})


def new_tab(d, fast=True):
    """A fresh tab (its own sessionStorage), made the current one."""
    d.switch_to.new_window("tab")
    if fast:
        fast_timers(d)
    return d.current_window_handle


def by_id(d, element_id):
    return d.find_element(By.ID, element_id)


def text_of(d, element_id) -> str:
    try:
        return by_id(d, element_id).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def messages(d) -> list[str]:
    return d.execute_script(
        "return Array.from(document.querySelectorAll('#log li.entry .message'), e => e.textContent)")


def wait_status(d, status, timeout=15):
    browser.wait_until(d, lambda d: text_of(d, "job-status") == status, timeout,
                       f"the page to show the status {status}")


def wait_message(d, message, timeout=15):
    browser.wait_until(d, lambda d: message in messages(d), timeout, f"the page to show the entry {message!r}")


def visible(d, element_id) -> bool:
    try:
        return by_id(d, element_id).is_displayed()
    except (NoSuchElementException, StaleElementReferenceException):
        return False


def mark_page(d):
    """Mark the page in the tab: the mark is gone once the tab loads another page (or reloads)."""
    d.execute_script("window.__kept = 'no reload'")


def page_kept(d) -> bool:
    return d.execute_script("return window.__kept") == "no reload"


def navigation_status(d) -> int:
    return d.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")


def screenshot_path(tmp_path, name) -> Path:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        return ROOT / "docs" / name
    return tmp_path / name


#
# A person runs a job from its form and watches it.
#


def test_form_to_live_log_to_final_status(driver, site):
    d = driver
    new_tab(d, fast=False)  # the script's own pace
    d.get(site.url("/templates/stages"))
    assert d.title == "Run stages · Job server"
    lines = by_id(d, "var-Lines")
    lines.clear()
    lines.send_keys("4")
    Select(by_id(d, "var-Mode")).select_by_visible_text("loud")
    d.find_element(By.CSS_SELECTOR, "#run-form button[type=submit]").click()
    browser.wait_until(d, lambda d: urllib.parse.urlsplit(d.current_url).path.startswith("/jobs/"), 10)
    token = urllib.parse.urlsplit(d.current_url).path.rsplit("/", 1)[1]
    assert token.isdigit() and not urllib.parse.urlsplit(d.current_url).query
    mark_page(d)
    wait_message(d, "stage 1 (loud)")
    wait_status(d, "Executing")
    site.release(token, 1)
    wait_message(d, "stage 2 line 4")
    assert "stage 3 line 1" not in messages(d)
    assert visible(d, "cancel-form") and text_of(d, "job-status") == "Executing"
    site.release(token, 2)
    site.release(token, 3)
    wait_status(d, "Warning")  # the last line went to stderr
    wait_message(d, "all stages done")
    assert page_kept(d), "the page was reloaded"
    assert messages(d) == ["stage 1 (loud)", *(f"stage {s} line {i}" for s in (2, 3) for i in range(1, 5)),
                           "all stages done"]
    levels = d.execute_script("return Array.from(document.querySelectorAll('#log li.entry'),"
                              " e => [e.className, e.querySelector('.level').textContent, getComputedStyle(e).color])")
    assert [level[:2] for level in levels] == [["entry level-info", "INFO"]] * 9 + [["entry level-warn", "WARN"]]
    assert levels[-1][2] != levels[0][2], levels  # a warning is styled apart
    assert by_id(d, "job-finished").find_element(By.TAG_NAME, "time").text
    assert by_id(d, "job-duration").text.endswith(" s")
    browser.wait_until(d, lambda d: not visible(d, "cancel-form"), 5, "the Cancel button to go")
    assert page_kept(d)


def test_page_follows_the_end_of_the_log_until_the_person_scrolls_up(driver, site):
    d = driver
    token = site.trigger("stages", Lines="80")
    site.wait_log(token, "stage 1")
    d.get(site.url(f"/jobs/{token}"))
    wait_message(d, "stage 1 (calm)")
    site.release(token, 1)
    wait_message(d, "stage 2 line 80")

    def at_end(d):
        return d.execute_script(
            "return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 2")

    browser.wait_until(d, at_end, 5, "the page to follow the end of the log")
    assert d.execute_script("return document.documentElement.scrollHeight") > HIGH * 1.5
    d.execute_script("window.scrollBy(0, -600)")
    kept = d.execute_script("return window.scrollY")
    site.release(token, 2)
    wait_message(d, "stage 3 line 80")
    assert d.execute_script("return window.scrollY") == kept, "the page scrolled though the person had scrolled up"
    site.release(token, 3)
    wait_status(d, "Warning")


def test_page_opened_on_a_long_running_log_follows_its_end(driver, site):
    """Someone opens a running job whose log is already longer than the screen and scrolls nowhere: new
    entries keep the end of the log in view."""
    d = driver
    token = site.trigger("stages", Lines="80")
    site.release(token, 1)
    site.wait_log(token, "stage 2 line 80")
    d.get(site.url(f"/jobs/{token}"))
    assert d.execute_script("return document.documentElement.scrollHeight") > HIGH * 1.5
    site.release(token, 2)
    wait_message(d, "stage 3 line 80")
    try:
        browser.wait_until(d, lambda d: d.execute_script(
            "return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 2"), 1.5)
    except TimeoutException:
        pytest.fail(f"the page stayed at scrollY={d.execute_script('return window.scrollY')} while the log grew"
                    " below it: it does not follow the end of the log of a job opened while it runs")
    finally:
        site.release(token, 3)


def test_refused_value_shows_its_reason_next_to_the_field(driver, site):
    d = driver
    before = site.job_count()
    d.get(site.url("/templates/pick"))
    target = by_id(d, "var-Target")
    target.send_keys("NOT lower")
    Select(by_id(d, "var-Mode")).select_by_visible_text("slow")
    by_id(d, "var-Password").send_keys(SECRET)
    submit = d.find_element(By.CSS_SELECTOR, "#run-form button[type=submit]")
    target.clear()
    submit.click()  # required, in the browser
    assert d.execute_script("return arguments[0].validity.valueMissing", target)
    target.send_keys("NOT lower")
    submit.click()
    # the browser holds the form back (the pattern as a hint)
    assert urllib.parse.urlsplit(d.current_url).path == "/templates/pick"
    assert d.execute_script("return arguments[0].matches(':invalid') && arguments[0].validationMessage", target)
    assert site.job_count() == before
    # and the server refuses it again, with the API's reason, when the browser does not check
    reason = site.api("/api/jobs/trigger", status=400, template="pick", Target="NOT lower")
    d.execute_script("arguments[0].removeAttribute('pattern')", target)
    submit.click()
    browser.wait_until(d, lambda d: visible(d, "problem-Target"), 10, "the reason to show")
    problem = by_id(d, "problem-Target")
    assert problem.text == reason
    field = d.execute_script("return arguments[0].closest('.field')", problem)
    assert field.find_element(By.ID, "var-Target")
    target = by_id(d, "var-Target")
    input_box, problem_box = target.rect, problem.rect
    assert 0 <= problem_box["y"] - (input_box["y"] + input_box["height"]) < 120  # right below it
    assert "problem-Target" in target.get_attribute("aria-describedby")
    assert navigation_status(d) == 400
    assert target.get_attribute("value") == "NOT lower"
    assert Select(by_id(d, "var-Mode")).first_selected_option.get_attribute("value") == "slow"
    assert by_id(d, "var-Password").get_attribute("value") == "" and SECRET not in d.page_source
    assert site.job_count() == before
    # corrected (and the secret typed again), it runs
    target.clear()
    target.send_keys("fixed")
    by_id(d, "var-Password").send_keys(SECRET)
    by_id(d, "run-form").submit()
    browser.wait_until(d, lambda d: "/jobs/" in d.current_url, 10)
    wait_status(d, "Succeeded")
    assert messages(d) == ["picked fixed slow ***"]


@pytest.mark.parametrize("field", ["Word", "Server", "Mail"])
def test_pattern_is_a_hint_in_the_browser(driver, site, field):
    """The pattern attribute holds the template's pattern; Chromium must be able to use it (it compiles it
    as a JavaScript pattern with the v flag, and ignores one it cannot compile)."""
    d = driver
    d.get(site.url("/templates/hosts"))
    box = by_id(d, f"var-{field}")
    box.send_keys("not valid at all!")
    assert d.execute_script("return arguments[0].matches(':invalid')", box), (
        f"the browser takes 'not valid at all!' for {field} (pattern={box.get_attribute('pattern')!r}):"
        " the pattern does not work as a hint")
    reason = site.api("/api/jobs/trigger", status=400, template="hosts", **{field: "not valid at all!"})
    assert reason.startswith(f"Variable {field}: the value does not match the pattern")


def test_cancel_stops_a_running_job(driver, site):
    d = driver
    token = site.trigger("sleeper")
    site.wait_log(token, "sleeping")
    pid = int(wait_for(lambda: (site.gates / f"{token}.pid").exists() and
                       (site.gates / f"{token}.pid").read_text().strip(), 10, what="the job's pid"))
    d.get(site.url(f"/jobs/{token}"))
    wait_status(d, "Executing")
    button = d.find_element(By.CSS_SELECTOR, "#cancel-form button")
    assert button.text == "Cancel" and button.is_displayed()
    button.click()
    browser.wait_until(d, lambda d: text_of(d, "job-status") == "Error", 15, "the job to end in Error")
    assert site.status(token) == "Error"
    assert any("cancel" in m.lower() for m in messages(d)), messages(d)
    wait_for(lambda: not process_alive(pid), 5, what=f"the job's process {pid} to be gone")
    assert not d.find_elements(By.CSS_SELECTOR, "#cancel-form")
    assert urllib.parse.urlsplit(d.current_url).path == f"/jobs/{token}"


def test_cancel_a_keyed_job_once_the_key_is_given(driver, site):
    d = driver
    token = site.trigger("vault", key=KEY, Target="cancel-me")
    site.wait_log(token, "vault opened", key=KEY)
    new_tab(d)
    d.get(site.url(f"/jobs/{token}"))
    by_id(d, "job-key").send_keys(KEY + Keys.ENTER)
    wait_status(d, "Executing")
    button = d.find_element(By.CSS_SELECTOR, "#cancel-form button")
    assert button.is_displayed()
    button.click()
    browser.wait_until(d, lambda d: text_of(d, "job-status") == "Error", 15, "the job to end in Error")
    assert site.status(token, key=KEY) == "Error"
    assert KEY not in d.current_url


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_run_again_fills_the_form(driver, site):
    d = driver
    token = site.trigger("pick", Target="abc", Mode="slow", Password=SECRET)
    site.final(token)
    d.get(site.url(f"/jobs/{token}"))
    again = by_id(d, "run-again")
    assert again.text == "Run again"
    again.click()
    browser.wait_until(d, lambda d: urllib.parse.urlsplit(d.current_url).path == "/templates/pick", 10)
    assert SECRET not in d.current_url and SECRET not in d.page_source
    assert by_id(d, "var-Target").get_attribute("value") == "abc"
    assert Select(by_id(d, "var-Mode")).first_selected_option.get_attribute("value") == "slow"
    assert by_id(d, "var-Password").get_attribute("value") == ""
    by_id(d, "run-form").submit()
    browser.wait_until(d, lambda d: urllib.parse.urlsplit(d.current_url).path.startswith("/jobs/"), 10)
    wait_status(d, "Succeeded")
    assert messages(d) == ["picked abc slow "]  # no password: it was not filled in


#
# Keys.
#


def test_keyed_job_shows_nothing_protected_until_the_key_is_given(driver, site):
    d = driver
    token = site.trigger("vault", key=KEY, Target="zebra", Password=SECRET)
    site.wait_log(token, "vault opened", key=KEY)
    new_tab(d)
    d.get(site.url(f"/jobs/{token}"))
    assert navigation_status(d) == 403
    assert text_of(d, "job-status") == "key needed"
    assert not visible(d, "job-details") and visible(d, "key-form")
    for hidden in ("zebra", "vault opened", "Executing", SECRET):
        assert hidden not in d.page_source, hidden
    # a wrong key: the API's reason, nothing shown, nothing kept
    wrong = site.api("/api/jobs/status", status=403, token=token, key="wrong-key")
    by_id(d, "job-key").send_keys("wrong-key")
    by_id(d, "job-key").send_keys(Keys.ENTER)
    browser.wait_until(d, lambda d: wrong in d.find_element(By.ID, "key-form").text, 10, "the refusal")
    assert text_of(d, "job-status") == "key needed" and not visible(d, "job-details")
    assert not browser.session_storage(d)
    # the right key: status, variables and log, live
    mark_page(d)
    key_box = by_id(d, "job-key")
    key_box.clear()
    key_box.send_keys(KEY)
    key_box.send_keys(Keys.ENTER)
    wait_status(d, "Executing")
    wait_message(d, "vault opened for zebra")
    assert visible(d, "job-details") and not visible(d, "key-form")
    shown = d.execute_script("return Array.from(document.querySelectorAll('#job-variables tbody tr'),"
                             " r => [r.cells[0].textContent, r.cells[1].textContent])")
    assert dict(shown) == {"Target": "zebra", "Password": "••••••"}
    site.release(token)
    wait_status(d, "Succeeded")
    wait_message(d, "vault closed")
    assert page_kept(d)
    # where the key is and is not: in this tab's sessionStorage only
    assert browser.session_storage(d) == {"jobserver-key:vault": KEY}
    assert d.execute_script("return localStorage.length") == 0
    assert d.get_cookies() == [] and d.execute_script("return document.cookie") == ""
    assert KEY not in d.current_url and KEY not in d.page_source
    urls = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not [u for u in urls if KEY in u]
    # the raw log, for a keyed job, without the key in its address
    d.find_element(By.CSS_SELECTOR, "#raw-form button").click()
    browser.wait_until(d, lambda d: len(d.window_handles) == 3, 10, "the raw log's tab")
    d.switch_to.window(d.window_handles[-1])
    browser.wait_until(d, lambda d: "vault closed" in d.find_element(By.TAG_NAME, "body").text, 10)
    assert d.find_element(By.TAG_NAME, "body").text == site.logs(token, key=KEY).rstrip("\n")
    assert KEY not in d.current_url
    d.close()
    d.switch_to.window(d.window_handles[1])
    # the tab keeps it across a reload; a new tab does not have it
    d.refresh()
    wait_status(d, "Succeeded")
    new_tab(d)
    d.get(site.url(f"/jobs/{token}"))
    assert text_of(d, "job-status") == "key needed" and not browser.session_storage(d)
    assert "vault closed" not in d.page_source
    # nor the server's log, nor its database
    assert KEY not in site.server.stderr()
    for path in Path(site.server.db).parent.glob(Path(site.server.db).name + "*"):
        assert KEY.encode() not in path.read_bytes(), path


def test_keyed_form_needs_the_key_and_the_job_page_then_shows_the_job(driver, site):
    d = driver
    new_tab(d)
    before = site.job_count()
    d.get(site.url("/templates/vault"))
    by_id(d, "var-Target").clear()
    by_id(d, "var-Target").send_keys("yak")
    key_box = by_id(d, "run-key")
    assert key_box.get_attribute("type") == "password"
    by_id(d, "run-form").find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert d.execute_script("return arguments[0].matches(':invalid')", key_box)  # required, in the browser
    d.execute_script("arguments[0].removeAttribute('required')", key_box)
    by_id(d, "run-form").find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    browser.wait_until(d, lambda d: visible(d, "problem-key"), 10)
    assert by_id(d, "problem-key").text == site.api("/api/jobs/trigger", status=403, template="vault")
    assert site.job_count() == before
    assert by_id(d, "var-Target").get_attribute("value") == "yak"
    by_id(d, "run-key").send_keys(KEY)
    by_id(d, "run-form").find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    browser.wait_until(d, lambda d: "/jobs/" in d.current_url, 10)
    token = urllib.parse.urlsplit(d.current_url).path.rsplit("/", 1)[1]
    wait_message(d, "vault opened for yak")  # the key the form was given, from this tab
    wait_status(d, "Executing")
    site.release(token)
    wait_status(d, "Succeeded")
    assert KEY not in d.current_url


def test_job_page_with_javascript_off(driver, site):
    """Readable without the script: the list, a job and its log, and the key form posting the key."""
    d = driver
    plain = site.trigger("pick", Target="nojs")
    keyed = site.trigger("vault", key=KEY, Target="quiet")
    site.release(keyed)
    site.final(plain)
    site.final(keyed, key=KEY)
    new_tab(d)
    d.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    d.get(site.url("/"))
    assert d.find_element(By.LINK_TEXT, plain).get_attribute("href").endswith(f"/jobs/{plain}")
    d.get(site.url(f"/jobs/{plain}"))
    assert text_of(d, "job-status") == "Succeeded" and messages(d) == ["picked nojs fast "]
    d.get(site.url(f"/jobs/{keyed}"))
    assert text_of(d, "job-status") == "key needed"
    by_id(d, "job-key").send_keys(KEY)
    by_id(d, "key-form").find_element(By.CSS_SELECTOR, "button").click()
    browser.wait_until(d, lambda d: text_of(d, "job-status") == "Succeeded", 10)
    assert messages(d) == ["vault opened for quiet", "vault closed"]
    assert KEY not in d.current_url and not d.get_cookies()


#
# Text, never HTML.
#


PAYLOAD_TAGS = "img, svg, iframe, object, embed, video, audio, math, style, base, details, marquee, noscript, textarea"


def assert_nothing_ran(d, title):
    state = d.execute_script(
        "return {pwned: typeof window.__pwned, parentPwned: typeof parent.__pwned, title: document.title,"
        f" tags: document.querySelectorAll({PAYLOAD_TAGS!r}).length,"
        " scripts: Array.from(document.scripts, s => s.getAttribute('src')),"
        " ids: !!(document.getElementById('pwn') || document.getElementById('pwnbutton')),"
        " handlers: Array.from(document.querySelectorAll('*')).filter("
        "   e => Array.from(e.attributes).some(a => a.name.startsWith('on'))).length,"
        " forms: Array.from(document.forms, f => f.getAttribute('action'))}")
    assert state["pwned"] == "undefined" and state["parentPwned"] == "undefined", state
    assert state["title"] == title, state
    assert state["tags"] == 0 and not state["ids"] and state["handlers"] == 0, state
    assert state["scripts"] == ["/static/page.js"], state
    assert all(action.startswith("/") for action in state["forms"]), state
    assert not browser.csp_violations(d)


def test_injection_payloads_are_shown_as_text_and_run_nothing(driver, site):
    d = driver
    (site.gates / "payloads.txt").write_text("".join(p + "\n" for p in PAYLOADS))
    variables = {f"P{i:02d}": payload for i, payload in enumerate(PAYLOADS)}
    token = site.trigger("inject", **variables)
    site.wait_log(token, "ready")
    d.get(site.url(f"/jobs/{token}"))
    title = f"Job {token} · Job server"
    wait_message(d, "ready")
    site.release(token)  # the process prints them while the page is open: they arrive by the script
    wait_status(d, "Succeeded")
    browser.wait_until(d, lambda d: len(messages(d)) == len(PAYLOADS) + 1, 10)
    assert messages(d) == ["ready", *PAYLOADS]
    shown = dict(d.execute_script("return Array.from(document.querySelectorAll('#job-variables tbody tr'),"
                                  " r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert shown == variables
    assert_nothing_ran(d, title)
    for element in d.find_elements(By.CSS_SELECTOR, "#log li .message")[:5]:
        element.click()  # a javascript: payload is text, not a link
    assert_nothing_ran(d, title)
    # the same, rendered by the server
    d.refresh()
    assert messages(d) == ["ready", *PAYLOADS]
    assert_nothing_ran(d, title)
    # the form's values, through Run again and the query string
    breaking = [p for p in PAYLOADS if p.startswith(('"', "'", "</"))]  # out of an attribute or element
    assert len(breaking) >= 6
    for payload in breaking:
        d.get(site.url("/templates/echo?" + urllib.parse.urlencode({"Text": payload})))
        assert by_id(d, "var-Text").get_attribute("value") == payload
        assert_nothing_ran(d, "Run echo · Job server")
    d.get(site.url("/"))
    assert_nothing_ran(d, "Recent jobs · Job server")


def test_injection_through_the_form_and_the_key_unlock(driver, site):
    """Values typed into the form (a declared field and added rows) and a keyed job's variables, which the
    script fills in once the key is given."""
    d = driver
    d.get(site.url("/templates/echo"))
    by_id(d, "var-Text").send_keys(PAYLOADS[1])
    add = by_id(d, "add-variable")
    assert add.is_displayed()
    rows = d.find_elements(By.CSS_SELECTOR, "#new-variables .row")
    add.click()
    assert len(d.find_elements(By.CSS_SELECTOR, "#new-variables .row")) == len(rows) + 1
    names = d.find_elements(By.CSS_SELECTOR, 'input[name="new-name"]')
    values = d.find_elements(By.CSS_SELECTOR, 'input[name="new-value"]')
    for index, (name, value) in enumerate(zip(names, values)):
        label = d.find_element(By.CSS_SELECTOR, f'label[for="{name.get_attribute("id")}"]')
        assert label.text == "Name"  # the added row's inputs are labelled too
        name.send_keys(f"Added{index}")
        value.send_keys(PAYLOADS[index + 2])
    by_id(d, "run-form").submit()
    browser.wait_until(d, lambda d: "/jobs/" in d.current_url, 10)
    token = urllib.parse.urlsplit(d.current_url).path.rsplit("/", 1)[1]
    wait_status(d, "Succeeded")
    assert messages(d) == [PAYLOADS[1]]
    shown = dict(d.execute_script("return Array.from(document.querySelectorAll('#job-variables tbody tr'),"
                                  " r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert shown == {"Text": PAYLOADS[1], **{f"Added{i}": PAYLOADS[i + 2] for i in range(len(names))}}
    assert_nothing_ran(d, f"Job {token} · Job server")

    variables = {f"P{i:02d}": payload for i, payload in enumerate(PAYLOADS)}
    keyed = site.trigger("vault", key=KEY, Target=PAYLOADS[0], **variables)
    site.release(keyed)
    site.final(keyed, key=KEY)
    new_tab(d)
    d.get(site.url(f"/jobs/{keyed}"))
    by_id(d, "job-key").send_keys(KEY + Keys.ENTER)
    wait_status(d, "Succeeded")
    shown = dict(d.execute_script("return Array.from(document.querySelectorAll('#job-variables tbody tr'),"
                                  " r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert shown == {"Target": PAYLOADS[0], "Password": "••••••", **variables}
    assert messages(d) == [f"vault opened for {PAYLOADS[0]}", "vault closed"]
    assert_nothing_ran(d, f"Job {keyed} · Job server")


#
# The pages themselves: CSP, the cross-site rules, live updates, long logs, people.
#


def test_no_csp_violation_on_any_page(driver, site):
    d = driver
    finished = site.trigger("pick", Target="tour")
    running = site.trigger("stages")
    keyed = site.trigger("vault", key=KEY)
    site.final(finished)
    paths = ["/", "/?status=Succeeded", "/?template=pick", f"/jobs/{finished}", f"/jobs/{running}",
             f"/jobs/{keyed}", "/templates/pick", "/templates/vault", "/templates/echo", "/nope", "/jobs/999999",
             "/templates/nope"]
    for path in paths:
        d.get(site.url(path))
        browser.wait_until(d, lambda d: d.execute_script("return document.readyState") == "complete", 10)
    d.get(site.url(f"/jobs/{keyed}"))
    by_id(d, "job-key").send_keys(KEY + Keys.ENTER)  # the unlocked page, drawn by the script
    wait_status(d, "Executing")
    d.get(site.url(f"/jobs/{running}"))
    site.release(running, 1)
    wait_message(d, "stage 2 line 3")
    fetched = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith(site.base + "/") for url in fetched), fetched  # nothing from elsewhere
    errors = [e for e in browser.console_errors(d) if "status of 40" not in e["message"]]
    assert not browser.csp_violations(d)
    assert not errors, errors  # nor any script error
    for stage in (2, 3):
        site.release(running, stage)
    site.release(keyed)


class Attacker:
    """Another origin's pages (a second http.server on 127.0.0.1), each a form that submits itself through
    an external script of that origin."""

    def __init__(self, pages: dict[str, str]):
        self.pages = {**pages, "/go.js": "document.forms[0].submit();"}

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.pages.get(self.path)
                data = (body or "not found").encode()
                self.send_response(200 if body is not None else 404)
                kind = "text/javascript" if self.path.endswith(".js") else "text/html"
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def attack_form(action: str, method: str, fields: dict[str, str]) -> str:
    inputs = "".join(f'<input type="hidden" name="{n}" value="{v}">' for n, v in fields.items())
    return (f'<!doctype html><title>win a prize</title><form method="{method}" action="{action}">{inputs}</form>'
            '<script src="/go.js"></script>')


def test_a_form_posted_from_another_origin_creates_no_job(driver, site):
    d = driver
    victim = site.trigger("sleeper")
    site.wait_log(victim, "sleeping")
    app = site.base
    attacker = Attacker({
        "/api-post.html": attack_form(f"{app}/api/jobs/trigger?template=quick", "post", {"x": "1"}),
        "/api-get.html": attack_form(f"{app}/api/jobs/trigger", "get", {"template": "quick"}),
        "/page-post.html": attack_form(f"{app}/templates/pick", "post", {"Target": "evil", "page-token": "1.0"}),
        "/cancel.html": attack_form(f"{app}/jobs/{victim}/cancel", "post", {"page-token": "1.0"}),
        "/api-cancel.html": attack_form(f"{app}/api/jobs/cancel", "post", {"token": victim}),
    })
    try:
        before = site.job_count()
        everything = ("/api-post.html", "/api-get.html", "/page-post.html", "/cancel.html", "/api-cancel.html")
        attacks = [("127.0.0.1", page) for page in ("/api-post.html", "/page-post.html", "/cancel.html")]  # same site
        attacks += [("localhost", page) for page in everything]  # another site
        for host, page in attacks:
            d.get(f"http://{host}:{attacker.port}{page}")
            browser.wait_until(d, lambda d: d.current_url.startswith(app), 10, f"{page} to submit")
            browser.wait_until(d, lambda d: d.execute_script("return document.readyState") == "complete", 10)
            assert navigation_status(d) == 403, (host, page, d.find_element(By.TAG_NAME, "body").text)
            body = d.find_element(By.TAG_NAME, "body").text
            assert "refused" in body or "did not come from this server" in body, (host, page, body)
        assert site.job_count() == before
        assert site.status(victim) == "Executing"
    finally:
        attacker.close()
        site.api("/api/jobs/cancel", token=victim)


@pytest.mark.alone
def test_live_updates_back_off_pause_while_hidden_and_stop_when_final(driver, site):
    """The script's timers, recorded (and shortened twenty-fold, so the test takes a moment): each poll is a
    short request; while nothing changes the delay grows; a hidden tab polls not at all; a final job not
    again."""
    d = driver
    token = site.trigger("stages")
    site.wait_log(token, "stage 1")
    new_tab(d, fast=False)
    script = d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__delays = [];
        const original = window.setTimeout.bind(window);
        window.setTimeout = (callback, delay, ...rest) => {
          window.__delays.push(delay);
          return original(callback, Math.max(1, (delay || 0) / 20), ...rest);
        };"""})
    try:
        d.get(site.url(f"/jobs/{token}"))
        updates = ("return performance.getEntriesByType('resource').filter("
                   "e => e.name.includes('/updates')).map(e => [e.name, e.responseEnd - e.startTime])")
        browser.wait_until(d, lambda d: len(d.execute_script("return window.__delays")) >= 7, 10)
        delays = d.execute_script("return window.__delays")
        assert delays[0] == 500 and all(b >= a for a, b in itertools.pairwise(delays)), delays
        assert max(delays) == 5000 and delays[1] > delays[0], delays  # backs off to 5 s while nothing changes
        requests = d.execute_script(updates)
        assert len(requests) >= 6 and all(f"/jobs/{token}/updates?offset=" in url for url, _ in requests)
        assert max(took for _, took in requests) < 1000, requests  # short requests, none held open
        # hidden: no more polls (the next timer may still fire once, and then finds the tab hidden)
        d.minimize_window()
        assert d.execute_script("return document.visibilityState") == "hidden"
        browser.wait_until(d, lambda d: quiet(d, updates, 0.6), 10, "the hidden tab to stop polling")
        # visible again: polls at once at the first pace, and sees the change
        d.execute_script("window.__delays = []")
        restore_window(d)
        assert d.execute_script("return document.visibilityState") == "visible"
        browser.wait_until(d, lambda d: d.execute_script("return window.__delays.length") >= 1, 5)
        assert d.execute_script("return window.__delays[0]") == 500
        site.release(token, 1)
        wait_message(d, "stage 2 line 3")
        for stage in (2, 3):
            site.release(token, stage)
        wait_status(d, "Warning")
        wait_message(d, "all stages done")
        # final: the polls stop
        browser.wait_until(d, lambda d: quiet(d, updates, 0.6), 10, "the polls to stop once the job is final")
    finally:
        d.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
        restore_window(d)


def quiet(d, updates_script, seconds) -> bool:
    """Whether the page makes no update request for `seconds` (≥ 6 polls of the shortened 500 ms timer)."""
    count = len(d.execute_script(updates_script))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(d.execute_script(updates_script)) != count:
            return False
        time.sleep(0.05)
    return True


def restore_window(d):
    window = d.execute_cdp_cmd("Browser.getWindowForTarget", {})
    d.execute_cdp_cmd("Browser.setWindowBounds", {"windowId": window["windowId"],
                                                  "bounds": {"windowState": "normal"}})


@pytest.mark.alone
def test_fifty_open_tabs_on_a_running_job_do_not_slow_triggers(site):
    """Fifty pollers at the script's quickest steady pace (a request each 500 ms) on a running job, while
    triggers are timed: the updates are short requests, so no HTTP thread is held between them."""
    token = site.trigger("stages")
    site.wait_log(token, "stage 1")

    def trigger_times(count):
        times = []
        for _ in range(count):
            started = time.perf_counter()
            site.trigger("quick")
            times.append(time.perf_counter() - started)
        return times

    baseline = trigger_times(10)
    stop, polls, failures = threading.Event(), [], []

    def tab():
        import http.client
        connection = http.client.HTTPConnection("127.0.0.1", site.server.port, timeout=10)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                connection.request("GET", f"/jobs/{token}/updates?offset=1")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(response.status)
                polls.append(time.perf_counter() - started)
                stop.wait(0.5)
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(repr(error))
        finally:
            connection.close()

    tabs = [threading.Thread(target=tab, daemon=True) for _ in range(50)]
    for thread in tabs:
        thread.start()
    try:
        wait_for(lambda: len(polls) >= 100, 10, what="the tabs to poll")
        loaded = trigger_times(20)
    finally:
        stop.set()
        for thread in tabs:
            thread.join(10)
        site.release(token, 1)
        site.release(token, 2)
        site.release(token, 3)
    print(f"\ntrigger: median {statistics.median(baseline) * 1000:.1f} ms alone,"
          f" {statistics.median(loaded) * 1000:.1f} ms (max {max(loaded) * 1000:.0f}) with 50 tabs polling;"
          f" {len(polls)} polls, median {statistics.median(polls) * 1000:.1f} ms")
    assert not failures, failures[:5]
    assert max(polls) < 2.0
    assert statistics.median(loaded) < max(0.25, 5 * statistics.median(baseline)), loaded
    assert max(loaded) < 2.0, loaded


def test_long_log_shows_its_end_and_loads_earlier_entries(driver, site):
    d = driver
    token = site.trigger("quick")
    site.final(token)
    count = 5000
    with contextlib.closing(sqlite3.connect(site.server.db, timeout=10)) as db, db:
        db.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?)"
                   " INSERT INTO logs (job_id, seq, level, message) SELECT ?, x, 'INFO', 'entry ' || x FROM c",
                   (count - 1, int(token)))
    d.get(site.url(f"/jobs/{token}"))
    shown = messages(d)
    assert len(shown) == 200 and shown[-1] == f"entry {count - 1}" and shown[0] == f"entry {count - 200}"
    size = d.execute_script("return performance.getEntriesByType('navigation')[0].decodedBodySize")
    assert size < 100_000, size
    earlier = by_id(d, "log-earlier")
    assert earlier.is_displayed() and f"{count - 200} earlier entries" in earlier.text
    button = by_id(d, "load-earlier")
    assert button.is_displayed()
    button.click()
    browser.wait_until(d, lambda d: len(messages(d)) == 700, 10, "500 earlier entries")
    shown = messages(d)
    assert shown[0] == f"entry {count - 700}" and shown[-1] == f"entry {count - 1}"
    assert d.execute_script("return document.getElementById('log').start") == count - 700 + 1
    assert f"{count - 700} earlier entries" in by_id(d, "log-earlier").text
    # the raw log link serves the API's text
    raw = by_id(d, "raw-log")
    assert raw.get_attribute("href") == site.url(f"/api/jobs/logs?token={token}")
    raw.click()
    browser.wait_until(d, lambda d: "/api/jobs/logs" in d.current_url, 10)
    assert d.find_element(By.TAG_NAME, "body").text == site.logs(token).rstrip("\n")


def test_keyboard_alone_runs_a_job(driver, site):
    d = driver
    d.get(site.url("/templates/pick"))
    body = d.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    order = []
    for _ in range(12):
        active = d.switch_to.active_element
        order.append(active.get_attribute("id") or active.get_attribute("class") or active.tag_name)
        if active.get_attribute("type") == "submit":
            break
        active.send_keys(Keys.TAB)
    assert order[:1] == ["home"] or "skip" in order[:2], order
    fields = ["var-Target", "var-Mode", "var-Password"]
    assert [item for item in order if item in fields] == fields, order
    assert d.switch_to.active_element.get_attribute("type") == "submit"
    # fill it by keyboard and send it with Enter
    by_id(d, "var-Target").click()
    d.switch_to.active_element.send_keys("keys")
    d.switch_to.active_element.send_keys(Keys.TAB)
    d.switch_to.active_element.send_keys("s")  # a select picks by typing
    d.switch_to.active_element.send_keys(Keys.TAB, "pw", Keys.ENTER)
    browser.wait_until(d, lambda d: "/jobs/" in d.current_url, 10)
    wait_status(d, "Succeeded")
    assert messages(d) == ["picked keys slow ***"]
    # on the job page: Run again is reachable, and followed, by keyboard
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    for _ in range(15):
        if d.switch_to.active_element.get_attribute("id") == "run-again":
            break
        d.switch_to.active_element.send_keys(Keys.TAB)
    assert d.switch_to.active_element.get_attribute("id") == "run-again"
    focus = d.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert focus != "none"  # the focus is seen
    d.switch_to.active_element.send_keys(Keys.ENTER)
    browser.wait_until(d, lambda d: "/templates/pick" in d.current_url, 10)


def test_phone_width_has_no_sideways_scroll(driver, site):
    d = driver
    long = "x" * 300 + " https://example.invalid/" + "path/" * 40
    token = site.trigger("echo", Text=long, SendNotification=long)
    site.final(token)
    browser.set_viewport(d, 390, 844)
    for path in ("/", f"/jobs/{token}", "/templates/pick", "/templates/echo", "/templates/vault", "/nope"):
        d.get(site.url(path))
        widths = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], (path, widths)
    d.get(site.url(f"/jobs/{token}"))
    assert messages(d) == [long]
    browser.screenshot(d, Path(site.server.directory) / "phone.png")


def test_phone_width_with_a_long_variable_name(driver, site):
    """Variable names may have 50 characters; the job page's table of variables must still fit a phone."""
    d = driver
    name = "Notification_address_for_failed_nightly_builds"
    token = site.trigger("echo", Text="short", **{name: "ops@example.com"})
    site.final(token)
    browser.set_viewport(d, 390, 844)
    d.get(site.url(f"/jobs/{token}"))
    widths = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    wider = d.execute_script("return Array.from(document.querySelectorAll('main *')).filter("
                             "e => e.getBoundingClientRect().right > innerWidth + 1).map(e => e.tagName + '#' + e.id)")
    assert widths[0] <= widths[1], f"scrolls sideways ({widths}); wider than the screen: {wider[:4]}"


def luminance(css_colour: str) -> float:
    red, green, blue = (int(part) for part in re.findall(r"\d+", css_colour)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def test_dark_theme_when_the_system_asks(driver, site):
    d = driver
    colours = {}
    try:
        for scheme in ("light", "dark"):
            d.execute_cdp_cmd("Emulation.setEmulatedMedia",
                              {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
            d.get(site.url("/templates/pick"))
            colours[scheme] = d.execute_script(
                "const b = getComputedStyle(document.body), i = getComputedStyle(document.getElementById('var-Target'));"
                "return [b.backgroundColor, b.color, i.backgroundColor, i.color]")
    finally:
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    light, dark = ([luminance(c) for c in colours[s]] for s in ("light", "dark"))
    assert light[0] > 0.8 and light[1] < 0.3 and light[2] > 0.8, colours
    assert dark[0] < 0.2 and dark[1] > 0.7 and dark[2] < 0.2 and dark[3] > 0.7, colours


def test_times_in_the_browsers_time_zone(driver, site):
    d = driver
    token = site.trigger("stages")
    site.wait_log(token, "stage 1")
    zone = "Asia/Kathmandu"  # UTC+05:45: the minutes differ from UTC's too
    d.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": zone})
    try:
        for path in ("/", f"/jobs/{token}"):
            d.get(site.url(path))
            moments = d.execute_script(
                "return Array.from(document.querySelectorAll('main time'), t => [t.dateTime, t.textContent])")
            assert moments, path
            for stamp, shown in moments:
                local = datetime.datetime.fromisoformat(stamp).astimezone(
                    zoneinfo.ZoneInfo(zone))
                assert "UTC" not in shown, (path, stamp, shown)
                assert f"{local.minute:02d}:{local.second:02d}" in shown, (path, stamp, shown, local)
                assert str(local.hour % 12 or 12) in shown or f"{local.hour:02d}" in shown, (stamp, shown, local)
        # the times the script adds as the job moves on are local too
        for stage in (1, 2, 3):
            site.release(token, stage)
        wait_status(d, "Warning")
        ended = by_id(d, "job-finished").find_element(By.TAG_NAME, "time")
        local = datetime.datetime.fromisoformat(ended.get_attribute("datetime")).astimezone(
            zoneinfo.ZoneInfo(zone))
        assert f"{local.minute:02d}:{local.second:02d}" in ended.text and "UTC" not in ended.text
    finally:
        d.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})


#
# The README's screenshots.
#

SHOWCASE_EXTRA = """
[build]
description = "Build and test the web app (a stand-in that only says what it would do)"
timeout = 120

[build.variables]
Branch = { default = "main", pattern = '[A-Za-z0-9._/-]+' }

[[build.steps]]
run = '''
echo "Checking out $Branch"
for step in "Installing dependencies" "Compiling 214 files" "Running unit tests" "Running integration tests" \\
            "Packaging the release" "Uploading artifacts"; do
  echo "$step"
  until [ -e "GATES/$JobToken.go" ]; do sleep 0.02; done
  rm -f "GATES/$JobToken.go"
done
echo "Build of $Branch finished"
'''
"""


def test_screenshots_for_the_readme(driver, tmp_path_factory, tmp_path):
    """docs/jobs.png (the list, jobs in every status) and docs/job.png (a job page while its log is live),
    from a server with templates.toml's examples."""
    d = driver
    directory = tmp_path_factory.mktemp("showcase")
    gates = directory / "gates"
    gates.mkdir()
    server = start_server(directory, (ROOT / "templates.toml").read_text()
                          + SHOWCASE_EXTRA.replace("GATES", str(gates)))
    showcase = Site(server, gates)
    try:
        finished = [showcase.trigger("ablast", TargetServer="ABLSV1", SendNotification="sdennis@example.com"),
                    showcase.trigger("disk-usage"), showcase.trigger("warn-example"),
                    showcase.trigger("fail-example"), showcase.trigger("hdars", key="secure123")]
        for token in finished[:4]:
            showcase.final(token)
        showcase.final(finished[4], key="secure123")
        counting = [showcase.trigger("countdown", From="30"), showcase.trigger("countdown", From="30")]
        waiting = showcase.trigger("countdown", From="30")  # max_concurrent = 2: Pending
        build = showcase.trigger("build", Branch="release/2.4")
        for _ in range(3):
            (gates / f"{build}.go").touch()
            wait_for(lambda: not (gates / f"{build}.go").exists(), 10, what="the build to move on")
        for token in counting:
            showcase.wait_log(token, "30")
        assert showcase.status(waiting) == "Pending"
        d.get(showcase.url("/"))
        words = d.execute_script("return Array.from(document.querySelectorAll('table.jobs .status'),"
                                 " s => s.textContent)")
        assert {"Succeeded", "Warning", "Error", "Executing", "Pending", "key needed"} <= set(words), words
        colours = dict(d.execute_script("return Array.from(document.querySelectorAll('table.jobs .status'),"
                                        " s => [s.textContent, getComputedStyle(s).color])"))
        assert len({colours[w] for w in ("Succeeded", "Warning", "Error", "Executing")}) == 4, colours
        jobs_png = browser.screenshot(d, screenshot_path(tmp_path, "jobs.png"))

        d.get(showcase.url(f"/jobs/{build}"))
        wait_message(d, "Running integration tests")
        (gates / f"{build}.go").touch()
        wait_message(d, "Packaging the release")  # arrived while the page was open
        assert text_of(d, "job-status") == "Executing" and visible(d, "cancel-form")
        job_png = browser.screenshot(d, screenshot_path(tmp_path, "job.png"))
        for path in (jobs_png, job_png):
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
        print(f"\nscreenshots: {jobs_png}, {job_png}")
    finally:
        for token in [*locals().get("counting", []), locals().get("waiting"), locals().get("build")]:
            if token:
                with contextlib.suppress(Exception):
                    showcase.api("/api/jobs/cancel", token=token)
        stop_server(server)

"""A real headless Chromium for browser tests, driven by Selenium, with nothing fetched from the network.

Why a module of its own: every browser test needs the same careful start-up. The machine reaches no network
but the package registries, so Selenium Manager (which downloads drivers and browsers) must never run; we run
as root, so Chromium needs --no-sandbox; and each browser must leave nothing behind (processes, profile, crash
database), because the suite turns warnings into failures and CI runs on the same machine.

Typical fixture, one browser per test module (start ~0.8 s, quit ~0.1 s):

    @pytest.fixture(scope="module")
    def driver():
        if browser.find_chromium() is None:
            pytest.skip(browser.MISSING_CHROMIUM)
        d = browser.start_browser()
        yield d
        d.quit()            # also removes the temporary profile and checks no process is left

Run `python tests/browser.py` for a self-check on this machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

# Selenium Manager only runs when no driver path is given; we always give one. Should some code path start it
# anyway, SE_OFFLINE makes it fail instead of downloading, and SE_AVOID_STATS stops its usage report.
os.environ["SE_OFFLINE"] = "true"
os.environ["SE_AVOID_STATS"] = "true"

from selenium import webdriver  # noqa: E402  (after the environment above)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MISSING_CHROMIUM = "Chromium is not installed: apt-get install chromium chromium-driver (Debian packages)"

# The real binary first: /usr/bin/chromium is Debian's shell launcher, which adds flags of its own from
# /etc/chromium.d (remote extensions, API keys) and prints a shell error on some machines.
BROWSER_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "chromium", "chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver", "chromedriver")

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root cannot use Chromium's sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",  # /dev/shm is small in containers; Chromium crashes when it fills
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)

T = TypeVar("T")


def _executable(name: str) -> str | None:
    """The absolute path of an executable file given by path or by name on PATH, else None."""
    path = shutil.which(name)
    return os.path.abspath(path) if path else None


def find_chromium() -> tuple[str, str] | None:
    """(browser_path, driver_path), or None when either is missing: the caller skips with MISSING_CHROMIUM.

    CHROMIUM and CHROMEDRIVER in the environment name other binaries; one that is set is the only candidate,
    so a wrong setting shows up as a skip instead of silently testing another browser.
    """
    def first(env_name: str, candidates: tuple[str, ...]) -> str | None:
        chosen = os.environ.get(env_name)
        for name in (chosen,) if chosen else candidates:
            if path := _executable(name):
                return path
        return None

    browser, driver = first("CHROMIUM", BROWSER_CANDIDATES), first("CHROMEDRIVER", DRIVER_CANDIDATES)
    return (browser, driver) if browser and driver else None


class Browser(webdriver.Chrome):
    """A webdriver.Chrome that owns a temporary directory (profile, crash database, driver log).

    quit() removes that directory and makes sure that no process of this browser is left: chromedriver stops
    Chromium, but a Chromium whose driver died stays alive (reparented to init), so any process still naming
    the directory after a grace period is killed.
    """

    def __init__(self, *, options: Options, service: Service, root: Path) -> None:
        self.root = root
        self._started = self._quitted = False
        super().__init__(options=options, service=service)
        self._started = True
        _live.add(self)

    def quit(self) -> None:
        if self._quitted:
            return
        self._quitted = True
        _live.discard(self)
        if not self._started:  # Chrome.__init__ failed and calls quit(); start_browser() cleans up
            try:
                super().quit()
            except Exception:  # noqa: BLE001 - there is no session to end; keep the first error
                pass
            return
        try:
            super().quit()
        finally:
            _end_processes(self.root)
            shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> list[int]:
        """Pids of this browser's processes still running: chromedriver and every Chromium process."""
        pids = _processes_naming(self.root)
        process = getattr(self.service, "process", None)
        if process is not None and process.poll() is None:
            pids.append(process.pid)
        return sorted(pids)


_live: weakref.WeakSet[Browser] = weakref.WeakSet()


@atexit.register
def _quit_all() -> None:
    """A test run that is interrupted before its fixture's teardown still takes its browsers down."""
    for driver in list(_live):
        try:
            driver.quit()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _processes_naming(text: Path) -> list[int]:
    """Pids whose command line contains `text` (each Chromium process names the profile or crash database)."""
    needle, pids = str(text).encode(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():  # zombies have an empty command line, so they do not count
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _end_processes(root: Path, grace: float = 2.0) -> None:
    """Wait up to `grace` seconds for the processes naming `root` to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    while (pids := _processes_naming(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_browser(width: int = 1280, height: int = 900, *, extra_args: tuple[str, ...] = ()) -> Browser:
    """Start headless Chromium with a viewport of exactly width x height CSS pixels (390x844: a phone).

    The browser console (including Content-Security-Policy violations) is captured for browser_log() and the
    helpers built on it. Raises RuntimeError(MISSING_CHROMIUM) when Chromium or chromedriver is missing.
    """
    found = find_chromium()
    if found is None:
        raise RuntimeError(MISSING_CHROMIUM)
    browser_path, driver_path = found
    root = Path(tempfile.mkdtemp(prefix="browser-test-"))

    options = Options()
    options.binary_location = browser_path
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={root / 'profile'}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    for flag in extra_args:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})

    # Chromium's crash reporter keeps its database under $XDG_CONFIG_HOME (~/.config/chromium by default) and
    # no flag turns it off; pointing XDG_* into our directory keeps $HOME clean and lets quit() find it.
    env = dict(os.environ, XDG_CONFIG_HOME=str(root / "config"), XDG_CACHE_HOME=str(root / "cache"))
    # driver_path_env_key: Selenium otherwise lets $SE_CHROMEDRIVER override the path we pass.
    service = Service(executable_path=driver_path, env=env, log_output=str(root / "chromedriver.log"),
                      driver_path_env_key="CHROMEDRIVER")
    try:
        driver = Browser(options=options, service=service, root=root)
    except Exception as error:
        service.stop()  # idempotent; closes the log file when the driver never started
        log = _tail(root / "chromedriver.log")
        _end_processes(root, grace=1.0)
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"Chromium did not start ({browser_path}, {driver_path}): {error}\n"
                           f"last lines of the chromedriver log:\n{log}") from error
    try:
        set_viewport(driver, width, height)
    except Exception:
        driver.quit()
        raise
    return driver


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no chromedriver log)"


def set_viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """Make the page viewport exactly width x height CSS pixels; it lasts across navigations in this tab.

    Why not only --window-size or set_window_size: headless Chromium keeps room for browser chrome (a 900 px
    high window has a 757 px high viewport) and will not make a window narrower than 500 px.
    """
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


# ---- console log -------------------------------------------------------------------------------------------

# Entries read so far, per driver: driver.get_log("browser") hands each entry out only once, so two helpers
# that both called it would each see only part of the log.
_logs: weakref.WeakKeyDictionary[Any, list[dict]] = weakref.WeakKeyDictionary()


def browser_log(driver: webdriver.Chrome) -> list[dict]:
    """Each console entry since the start or clear_browser_log(): dicts of level, message, source, timestamp.

    CSP violations are level SEVERE, source "security", and read (Chromium 156) "Executing inline script
    violates the following Content Security Policy directive ..." or "Applying inline style violates ...".
    """
    entries = _logs.setdefault(driver, [])
    entries.extend(driver.get_log("browser"))
    return list(entries)


def clear_browser_log(driver: webdriver.Chrome) -> None:
    """Forget the entries so far (e.g. before loading the page under test)."""
    browser_log(driver)
    _logs[driver].clear()


def console_errors(driver: webdriver.Chrome) -> list[dict]:
    """The SEVERE entries: uncaught exceptions, console.error, failed loads, CSP violations."""
    return [entry for entry in browser_log(driver) if entry["level"] == "SEVERE"]


def csp_violations(driver: webdriver.Chrome) -> list[dict]:
    """The entries that report a Content-Security-Policy violation."""
    return [entry for entry in browser_log(driver) if "content security policy" in entry["message"].lower()]


def wait_for_csp_violations(driver: webdriver.Chrome, count: int = 1, timeout: float = 5.0) -> list[dict]:
    """Wait until at least `count` CSP violations are logged; for violations that happen after the page load.

    Violations during parsing (inline <script>, style="" attributes) are already logged when driver.get()
    returns; those caused by later script (a timer, a click) are logged within a few ms of happening.
    """
    def enough(d: webdriver.Chrome) -> list[dict] | None:
        found = csp_violations(d)
        return found if len(found) >= count else None

    return wait_until(driver, enough, timeout, f"{count} CSP violation(s)")


# ---- small helpers -----------------------------------------------------------------------------------------


def wait_until(driver: webdriver.Chrome, condition: Callable[[Any], T], timeout: float = 10,
               message: str = "") -> T:
    """Poll condition(driver) every 50 ms until it returns something true, and return that.

    Raises selenium's TimeoutException after `timeout` seconds. Selenium's expected_conditions work here too.
    """
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def screenshot(driver: webdriver.Chrome, path: str | os.PathLike) -> Path:
    """Save a PNG of the viewport to `path` (creating its folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"could not save a screenshot to {path}")
    return path


def session_storage(driver: webdriver.Chrome) -> dict[str, str]:
    """The current page's sessionStorage (per origin and per tab: load a page of that origin first).

    execute_script runs through the DevTools protocol, so a page's CSP does not block it.
    """
    return driver.execute_script("return Object.assign({}, window.sessionStorage);")


def set_session_storage(driver: webdriver.Chrome, items: Mapping[str, str], clear: bool = False) -> None:
    """Store `items` in the current page's sessionStorage, after emptying it when `clear`."""
    driver.execute_script(
        "if (arguments[1]) sessionStorage.clear();"
        "for (const [k, v] of Object.entries(arguments[0])) sessionStorage.setItem(k, v);",
        dict(items), clear,
    )


# ---- self-check: python tests/browser.py -------------------------------------------------------------------


def _serve(pages: Mapping[str, tuple[str, str]], headers: Mapping[str, str]):
    """A ThreadingHTTPServer on 127.0.0.1 (free port) serving path -> (content type, body); returns it."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content_type, body = pages.get(self.path, ("text/plain", "not found"))
            data = body.encode()
            self.send_response(200 if self.path in pages else 404)
            for name, value in {**headers, "Content-Type": content_type, "Content-Length": len(data)}.items():
                self.send_header(name, str(value))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _self_check() -> None:
    import statistics
    import struct

    assert find_chromium() is not None, MISSING_CHROMIUM
    print("find_chromium():", find_chromium())
    os.environ["CHROMIUM"] = "/nonexistent/chromium"
    assert find_chromium() is None
    del os.environ["CHROMIUM"]

    # Were Selenium Manager started, this stand-in would leave a mark.
    trap = Path(tempfile.mkdtemp(prefix="se-manager-trap-"))
    (trap / "selenium-manager").write_text(f"#!/bin/sh\ntouch {trap}/ran\nexit 1\n")
    (trap / "selenium-manager").chmod(0o755)
    os.environ["SE_MANAGER_PATH"] = str(trap / "selenium-manager")
    crash_db = Path.home() / ".config" / "chromium"
    crash_db_before = crash_db.exists()

    csp = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'"}
    html = "<!doctype html><html><head><title>t</title>{}</head><body>{}</body></html>"
    pages = {
        "/plain": ("text/html", html.format("", "<p>plain</p>")),
        "/good": ("text/html", html.format('<script src="/ok.js"></script>', "<p>no violations</p>")),
        "/bad": ("text/html", html.format("", '<p style="color:red">x</p><script>document.title=1</script>')),
        "/late": ("text/html", html.format('<script src="/late.js"></script>', "<p id=p>late</p>")),
        "/favicon.ico": ("image/x-icon", ""),  # else its 404 is a SEVERE console entry on every first visit
        "/ok.js": ("text/javascript", "document.title = 'ok';"),
        "/late.js": ("text/javascript", "setTimeout(() => { window.t0 = Date.now();"
                     " document.getElementById('p').setAttribute('style', 'color:red'); }, 500);"),
    }
    server = _serve(pages, csp)
    base = f"http://127.0.0.1:{server.server_address[1]}"

    starts, quits, gets = [], [], []
    for _ in range(3):
        t = time.perf_counter()
        driver = start_browser()
        starts.append(time.perf_counter() - t)
        for _ in range(5):
            t = time.perf_counter()
            driver.get(base + "/plain")
            gets.append(time.perf_counter() - t)
        root, t = driver.root, time.perf_counter()
        driver.quit()
        quits.append(time.perf_counter() - t)
        assert not root.exists() and not _processes_naming(root) and not driver.processes()

    def ms(xs: list[float]) -> str:
        low, mid, high = (round(x * 1000) for x in (min(xs), statistics.median(xs), max(xs)))
        return f"median {mid} ms (min {low}, max {high})"

    print("start_browser():", ms(starts), "\nquit():", ms(quits), "\ndriver.get(trivial page):", ms(gets))

    driver = start_browser()
    try:
        driver.get(base + "/bad")
        found = csp_violations(driver)  # read at once: logged during parsing, before get() returns
        assert len(found) == 2 and driver.title == "t", found
        assert console_errors(driver) == found  # one read, both helpers see the same entries
        for entry in found:
            print("CSP:", entry["level"], entry["source"], entry["message"][:110])
        clear_browser_log(driver)
        driver.get(base + "/good")
        assert driver.title == "ok" and not console_errors(driver) and not csp_violations(driver)
        driver.get(base + "/late")
        assert not csp_violations(driver)
        late = wait_for_csp_violations(driver, timeout=5)[0]
        seen, t0 = time.time() * 1000, driver.execute_script("return window.t0")
        print(f"violation 500 ms after load: logged +{late['timestamp'] - t0:.0f} ms,"
              f" seen +{seen - t0:.0f} ms")

        set_session_storage(driver, {"token": "abc"}, clear=True)  # under the strict CSP above
        assert session_storage(driver) == {"token": "abc"}
        assert wait_until(driver, lambda d: d.execute_script("return document.readyState") == "complete")

        set_viewport(driver, 390, 844)
        size = driver.execute_script("return [innerWidth, innerHeight, matchMedia('(width<400px)').matches]")
        shot = screenshot(driver, driver.root / "phone.png")
        png_size = struct.unpack(">II", shot.read_bytes()[16:24])
        print("390x844 viewport:", size, "screenshot", png_size)
        assert size == [390, 844, True] and png_size == (390, 844)
        pids = driver.processes()
        print(f"{len(pids)} processes while running (chromedriver + chromium)")
    finally:
        root = driver.root
        driver.quit()
    server.shutdown()
    server.server_close()
    assert not root.exists() and not _processes_naming(root)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/cmdline").read_bytes()], "left-over processes"  # zombies have none
    assert not (trap / "ran").exists(), "Selenium Manager ran"
    assert crash_db.exists() == crash_db_before, "Chromium wrote to ~/.config/chromium"
    shutil.rmtree(trap)
    print("self-check passed: no process, profile or Selenium Manager run left behind")


if __name__ == "__main__":
    _self_check()

"""Fixtures shared by the tests: an in-process app under WebTest on either store, a real `python app.py` on
loopback, a throwaway PostgreSQL server, and helpers that read a job store directly on both stores."""

import contextlib
import http.client
import itertools
import json
import os
import sqlite3
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import pytest
import webtest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app as server_module  # noqa: E402
from postgres_server import PostgresServer, missing_postgres_message  # noqa: E402


def pytest_configure(config):
    # Warnings are failures: a leaked connection or file shows up instead of passing quietly.
    config.addinivalue_line("filterwarnings", "error")
    config.addinivalue_line("filterwarnings", "ignore:'cgi' is deprecated:DeprecationWarning")  # WebOb on 3.11


def wait_for(condition, timeout=10.0, interval=0.01, what="a condition"):
    """Poll condition() until it returns something true, failing after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its reaper does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def read_pid(path: Path, timeout: float = 10) -> int:
    """Wait until a job has written its pid to `path`; returns it."""
    def pid():
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    return wait_for(pid, timeout, what=f"a pid in {path}")


def assert_gone(*pids: int, timeout: float = 5) -> None:
    for pid in pids:
        wait_for(lambda: not alive(pid), timeout, what=f"process {pid} to be gone")


@pytest.fixture
def leftovers():
    """A list to put the pids of job processes in; any still running at the end is killed (and was a bug
    that an assertion already reported)."""
    pids = []
    yield pids
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#
# The stores: SQLite in tmp_path, or a database on a PostgreSQL server the suite starts itself.
#


def require(problem: str):
    """Skip a test whose component is missing, naming what to install; under CI (CI=true), fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem} (CI=true: every test must run)")
    pytest.skip(problem)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of the suite's own, in a temporary directory, removed at the end."""
    problem = missing_postgres_message()
    if problem:
        require(problem)
    with PostgresServer() as server:
        yield server


_databases = itertools.count(1)


@pytest.fixture
def postgres_url(postgres):
    """A fresh, empty PostgreSQL database for one test."""
    name = f"test_{next(_databases)}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


def store_database(kind: str, request, tmp_path) -> str:
    """The --db value of a fresh store of this kind ("sqlite" or "postgresql")."""
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "jobs.db")


@pytest.fixture
def database(tmp_path):
    """The store make_app uses; modules that test both stores override it with a parametrized one."""
    return str(tmp_path / "jobs.db")


@contextlib.contextmanager
def connect(database: str):
    """A connection of the test's own to a store (SQLite path or PostgreSQL URL), committed on leaving."""
    if database.startswith("postgresql:"):
        import psycopg

        with psycopg.connect(database, autocommit=True) as connection:
            yield connection
    else:
        with contextlib.closing(sqlite3.connect(database, timeout=10)) as connection:
            yield connection
            connection.commit()


def query(database: str, sql: str, *args) -> list[tuple]:
    """Rows read from a store directly, on either kind: `?` placeholders, as in SQLite."""
    if database.startswith("postgresql:"):
        sql = sql.replace("?", "%s")
    with connect(database) as connection:
        cursor = connection.execute(sql, args)
        return cursor.fetchall() if cursor.description else []


def stored_variables(database: str, token) -> dict:
    """A job's variables as the store keeps them: a secret's value while the job is not final, None after."""
    variables, secrets = query(database, "SELECT variables, secrets FROM jobs WHERE id = ?", int(token))[0]
    return {**json.loads(variables), **json.loads(secrets or "{}")}


def job_count(database: str) -> int:
    return query(database, "SELECT count(*) FROM jobs")[0][0]


@pytest.fixture
def make_app(tmp_path, database):
    """make_app(templates_toml, **config) -> webtest.TestApp around a fresh app on the test's store."""
    apps = []

    def make(templates: str, **config):
        path = tmp_path / f"templates{len(apps)}.toml"
        path.write_text(textwrap.dedent(templates))
        settings = {"DATABASE": database, "TEMPLATES": str(path), "WORKERS": 2}
        settings.update(config)
        app = server_module.create_app(settings)
        apps.append(app)
        return webtest.TestApp(app)

    yield make
    for app in apps:
        server_module.shutdown_app(app, grace=5)


def final_status(client, token, key=None, timeout=20):
    """Wait (server side, with status&wait) until the job is final; returns the status word."""
    params = {"token": token, "wait": timeout}
    if key:
        params["key"] = key
    status = client.get("/api/jobs/status", params).text
    assert status in ("Succeeded", "Warning", "Error"), f"job {token} still {status}"
    return status


class ServerProcess:
    """A real `python app.py` on a free loopback port, with its own templates and database."""

    def __init__(self, directory: Path, templates: str, *args: str, db: Path | None = None):
        self.directory = Path(directory)
        self.templates = self.directory / "templates.toml"
        self.templates.write_text(textwrap.dedent(templates))
        self.db = db or self.directory / "jobs.db"
        self.args = list(args)
        self.process = None
        self.port = None
        self.stderr_path = self.directory / "server.stderr"

    def command(self):
        return [sys.executable, str(ROOT / "app.py"), "--port", "0", "--templates", str(self.templates),
                "--db", str(self.db), *self.args]

    def start(self, timeout=15.0):
        self.stderr_file = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self.stderr_file,
                                        cwd=self.directory, start_new_session=True)
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(f"server did not start: {self.stderr()}")
            if select.select([self.process.stdout], [], [], remaining)[0]:
                line += os.read(self.process.stdout.fileno(), 1)
        # "Serving on http://127.0.0.1:PORT (...)"
        self.port = int(line.split(b"http://127.0.0.1:")[1].split(b" ")[0])
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def request(self, method, path, params=None, body=None, headers=None, timeout=30):
        """(status, body text, headers dict) of one request on a new connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            url = path + ("?" + urllib.parse.urlencode(params) if params else "")
            if isinstance(body, dict):
                body = urllib.parse.urlencode(body)
                headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
            connection.request(method, url, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read().decode("utf-8"), dict(response.getheaders())
        finally:
            connection.close()

    def get(self, path, **params):
        return self.request("GET", path, params)

    def trigger(self, template, **variables):
        status, body, _ = self.get("/api/jobs/trigger", template=template, **variables)
        assert status == 200, body
        return body

    def final_status(self, token, timeout=30, **params):
        status, body, _ = self.get("/api/jobs/status", token=token, wait=timeout, **params)
        assert status == 200, body
        assert body in ("Succeeded", "Warning", "Error"), f"job {token} still {body}"
        return body

    def signal(self, signum):
        os.kill(self.process.pid, signum)

    def wait(self, timeout=60):
        code = self.process.wait(timeout)
        self.close_files()
        return code

    def close_files(self):
        self.stderr_file.close()
        self.process.stdout.close()

    def stop(self, timeout=60):
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        self.signal(signal.SIGKILL)
        return self.wait()


@pytest.fixture
def start_server(tmp_path):
    """start_server(templates_toml, *args, db=None) -> a started ServerProcess, stopped after the test."""
    servers = []

    def start(templates: str, *args: str, db=None, directory=None):
        directory = directory or tmp_path / f"server{len(servers)}"
        directory.mkdir(exist_ok=True)
        server = ServerProcess(directory, templates, *args, db=db or tmp_path / "jobs.db")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        if server.process is None:
            continue
        if server.process.poll() is None:
            try:
                server.process.send_signal(signal.SIGTERM)
                server.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
        server.close_files()


#
# Small helpers on a ServerProcess.
#


def status_word(server, token, **params):
    """The job's status word (GET /api/jobs/status, which must answer 200)."""
    status, body, _ = server.get("/api/jobs/status", token=token, **params)
    assert status == 200, body
    return body


def logs(server, token, **params):
    """The job's log text (GET /api/jobs/logs, which must answer 200)."""
    status, body, headers = server.get("/api/jobs/logs", token=token, **params)
    assert status == 200, body
    return body


def wait_for_log(server, token, text, timeout=10):
    """Follow the job's log (offset and wait) until `text` is in it; returns the log so far."""
    deadline = time.monotonic() + timeout
    seen, offset = "", 0
    while text not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"job {token} never logged {text!r}; log: {seen!r}"
        status, body, headers = server.get("/api/jobs/logs", token=token, offset=offset, wait=min(remaining, 5))
        assert status == 200, body
        seen += body
        offset = int(headers["X-Log-Offset"])
        if headers["X-Job-Complete"] == "true" and text not in seen:
            raise AssertionError(f"job {token} ended without logging {text!r}; log: {seen!r}")
    return seen

"""Fixtures and helpers shared by the tests: an in-process app under WebTest on either store, a real
`python app.py` on loopback, `app.main()` run in-process, a throwaway PostgreSQL server, helpers that read a
job store directly on both stores, and request helpers that work alike on an in-process app and a real server."""

import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import http.client
import itertools
import json
import logging
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import pytest
import webtest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app as server_module  # noqa: E402
from postgres_server import PostgresServer, missing_postgres_message  # noqa: E402

FORM = "application/x-www-form-urlencoded"
TEXT = "text/plain; charset=utf-8"
FINAL = ("Succeeded", "Warning", "Error")
STATUS_WORDS = ("Pending", "Executing", *FINAL)
LEVEL_PREFIXES = ("DEBUG: ", "INFO: ", "WARN: ", "ERROR: ")


def pytest_configure(config):
    # Warnings are failures: a leaked connection or file shows up instead of passing quietly.
    config.addinivalue_line("filterwarnings", "error")
    config.addinivalue_line("filterwarnings", "ignore:'cgi' is deprecated:DeprecationWarning")  # WebOb on 3.11
    # Raised inside hypothesis's report of a failing test where mypy_extensions is installed (by other
    # packages): as an error it hid the failure behind an INTERNALERROR.
    config.addinivalue_line("filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
    # pytest-benchmark, where some other project installed it, warns at start that xdist (pytest.ini) disables it.
    config.addinivalue_line("filterwarnings", "ignore:Benchmarks are automatically disabled")
    config.addinivalue_line("markers", "alone: runs while no other test runs (it bounds how long something takes,"
                                       " or it loads the machine); see pytest_runtest_protocol")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The suite runs in two processes (pytest-xdist, see pytest.ini); a test marked `alone` runs while the
    other process runs nothing of a test, not even the set-up or tear-down of a module's fixtures (servers,
    Chromium), so that its time bounds measure the server rather than a neighbour. Around each test's set-up,
    call and tear-down, a process passes a turnstile (an exclusive file lock, held only to pass it, or for
    the whole test when alone) and then holds a shared lock, or an exclusive one when alone: a test waiting to
    run alone holds the turnstile, so that no new test starts meanwhile."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process (-n 0)
        return (yield)
    alone = item.get_closest_marker("alone") is not None
    shared = Path(item.config.option.basetemp).parent  # xdist gives each process a folder of the run's own
    with open(shared / "turnstile.lock", "a") as turnstile, open(shared / "tests.lock", "a") as tests:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(tests, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        return (yield)  # closing the files releases the locks


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


#
# Job processes: pids that jobs write, and whether they still run.
#


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


def make_fifo(directory: Path, name: str) -> Path:
    """A fifo for a job to read a line from (`read line < "$Fifo"`): the job waits there until released."""
    path = directory / name
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


class FreshDatabases:
    """Empty databases on the suite's PostgreSQL server, each made a little before a test asks for it: a thread
    of its own keeps two ready and drops the used ones, so that no test waits for CREATE DATABASE (a tenth of
    a second or two, for every PostgreSQL test)."""

    AHEAD = 2

    def __init__(self, server: PostgresServer):
        self.server = server
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fresh-databases")
        self.ready = collections.deque(self.worker.submit(self.create) for _ in range(self.AHEAD))

    def create(self) -> tuple[str, str]:
        name = f"test_{next(_databases)}"
        return name, self.server.create_database(name)

    def take(self) -> tuple[str, str]:
        """(name, URL) of a fresh database; give the name back to drop() when done with it."""
        self.ready.append(self.worker.submit(self.create))
        return self.ready.popleft().result()

    def drop(self, name: str) -> None:
        self.worker.submit(self.server.drop_database, name)

    def close(self) -> None:
        self.worker.shutdown(wait=True)


@pytest.fixture(scope="session")
def fresh_databases(postgres):
    databases = FreshDatabases(postgres)
    yield databases
    databases.close()


@pytest.fixture
def postgres_url(fresh_databases):
    """A fresh, empty PostgreSQL database for one test."""
    name, url = fresh_databases.take()
    yield url
    fresh_databases.drop(name)


def store_database(kind: str, request, tmp_path) -> str:
    """The --db value of a fresh store of this kind ("sqlite" or "postgresql")."""
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "jobs.db")


@pytest.fixture
def database(tmp_path):
    """The store make_app uses; modules that test both stores override it with a parametrized one."""
    return str(tmp_path / "jobs.db")


def database_of(where) -> str:
    """The store of an in-process app (webtest.TestApp), of a real server (ServerProcess), or a store itself
    (a SQLite path or a PostgreSQL URL)."""
    if isinstance(where, webtest.TestApp):
        return where.app.config["DATABASE"]
    if isinstance(where, ServerProcess):
        return str(where.db)
    return str(where)


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


def query(where, sql: str, *args) -> list[tuple]:
    """Rows read from a store directly, on either kind: `?` placeholders, as in SQLite. `where` is the store
    or an app or server on it (see database_of)."""
    database = database_of(where)
    if database.startswith("postgresql:"):
        sql = sql.replace("?", "%s")
    with connect(database) as connection:
        cursor = connection.execute(sql, args)
        return cursor.fetchall() if cursor.description else []


def stored_variables(where, token) -> dict:
    """A job's variables as the store keeps them: a secret's value while the job is not final, None after."""
    variables, secrets = query(where, "SELECT variables, secrets FROM jobs WHERE id = ?", int(token))[0]
    return {**json.loads(variables), **json.loads(secrets or "{}")}


def job_count(where) -> int:
    """How many jobs the store holds (see database_of for `where`)."""
    return query(where, "SELECT count(*) FROM jobs")[0][0]


@contextlib.contextmanager
def adds_no_job(where):
    """Asserts that what the block does (a refused request) leaves the store with as many jobs as before."""
    before = job_count(where)
    yield
    assert job_count(where) == before, "a refused request added a job"


#
# An app in this process, under WebTest.
#


def new_app(templates_path: Path, database: str, **config) -> webtest.TestApp:
    """A started app on its own templates file and store; stop it with shutdown_app(client.app, grace)."""
    settings = {"DATABASE": database, "TEMPLATES": str(templates_path), "WORKERS": 2}
    settings.update(config)
    return webtest.TestApp(server_module.create_app(settings))


@pytest.fixture
def make_app(tmp_path, database):
    """make_app(templates_toml, **config) -> webtest.TestApp around a fresh app on the test's store; config
    holds create_app's upper-case keys (WORKERS=2 unless given). Every app is shut down after the test."""
    clients = []

    def make(templates: str, **config):
        path = tmp_path / f"templates{len(clients)}.toml"
        path.write_text(textwrap.dedent(templates))
        clients.append(new_app(path, database, **config))
        return clients[-1]

    yield make
    for client in clients:
        stop_app(client)


def stop_app(client: webtest.TestApp, grace: float = 5) -> None:
    """Shut an in-process app down (once: make_app's teardown skips an app a test already stopped)."""
    site = client.app.extensions["jobserver"]
    if not site.runner.stopped.is_set():
        server_module.shutdown_app(client.app, grace=grace)


@contextlib.contextmanager
def module_app(request, tmp_path_factory, templates: str, kind: str = "sqlite", **config):
    """One app on a fresh store of this kind, for a module-scoped fixture: the tables of requests that leave
    nothing behind for the other rows to see share it (an app per row would cost most of their run time)."""
    path = tmp_path_factory.mktemp("module-app") / "templates.toml"
    path.write_text(textwrap.dedent(templates))
    if kind == "postgresql":
        name, database = request.getfixturevalue("fresh_databases").take()
    else:
        database = str(path.parent / "jobs.db")
    client = new_app(path, database, **config)
    try:
        yield client
    finally:
        stop_app(client)
        if kind == "postgresql":
            request.getfixturevalue("fresh_databases").drop(name)


#
# Requests that work alike on an in-process app (webtest.TestApp) and a real server (ServerProcess).
#


class Answer(NamedTuple):
    status: int
    text: str
    headers: dict


def send(target, method: str, path: str, params=(), headers=None) -> Answer:
    """One request: its parameters (a dict or a list of pairs; None values left out) in the query string for
    GET, in a form body for POST."""
    pairs = [(name, value) for name, value in (params.items() if isinstance(params, dict) else params)
             if value is not None]
    if isinstance(target, ServerProcess):
        if method == "GET":
            return Answer(*target.request("GET", path, pairs, headers=headers))
        return Answer(*target.request(method, path, body=pairs, headers=headers))
    if method == "GET":
        response = target.get(path, pairs, headers=headers, expect_errors=True)
    else:
        response = target.request(path, method=method, body=urllib.parse.urlencode(pairs).encode(),
                                  headers={"Content-Type": FORM, **(headers or {})}, expect_errors=True)
    return Answer(response.status_int, response.text, response.headers)


def call(target, method: str, path: str, params=(), status=200, headers=None) -> Answer:
    """send(), checking the status code and that the answer is plain UTF-8 text."""
    answer = send(target, method, path, params, headers)
    assert answer.status == status, f"{method} {path} {params}: {answer.status} {answer.text!r}"
    assert answer.headers["Content-Type"] == TEXT, answer.headers
    return answer


def trigger(target, template, key=None, status=200, **variables) -> str:
    """The answer to GET /api/jobs/trigger: a token (checked to be one) when it must be 200, else the reason."""
    text = call(target, "GET", "/api/jobs/trigger", {"template": template, "key": key, **variables}, status).text
    if status == 200:
        assert re.fullmatch(r"[1-9][0-9]*", text), text
    else:
        assert text.strip(), "a refusal says why"
    return text


def status_of(target, token, key=None, **params) -> str:
    """The job's status word (GET /api/jobs/status, which must answer 200)."""
    word = call(target, "GET", "/api/jobs/status", {"token": token, "key": key, **params}).text
    assert word in STATUS_WORDS, word
    return word


def final_status(target, token, key=None, timeout=30) -> str:
    """Wait (server side, with status&wait) until the job is final; returns the status word."""
    word = status_of(target, token, key=key, wait=timeout)
    assert word in FINAL, f"job {token} still {word}"
    return word


def assert_well_formed_log(text: str) -> str:
    """A served log: every line (whatever a reader takes for a line break) starts with a real level prefix, no
    NUL, and a newline after the last line."""
    assert "\x00" not in text, f"NUL served in the log: {text[:300]!r}"
    assert text == "" or text.endswith("\n"), f"log does not end with a newline: {text[-100:]!r}"
    for line in text.splitlines():
        assert line.startswith(LEVEL_PREFIXES), f"a served line has no level prefix: {line[:200]!r}"
    return text


def logs_of(target, token, key=None, **params) -> str:
    """The job's log text (GET /api/jobs/logs, which must answer 200), checked to be well formed."""
    return assert_well_formed_log(call(target, "GET", "/api/jobs/logs", {"token": token, "key": key, **params}).text)


def run_job(target, template, key=None, **variables) -> tuple[str, str, str]:
    """Trigger, wait until final; (token, status, logs)."""
    token = trigger(target, template, key=key, **variables)
    return token, final_status(target, token, key=key), logs_of(target, token, key=key)


def wait_for_log(target, token, text, timeout=10):
    """Follow the job's log (offset and wait) until `text` is in it; returns the log so far."""
    deadline = time.monotonic() + timeout
    seen, offset = "", 0
    while text not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"job {token} never logged {text!r}; log: {seen!r}"
        answer = call(target, "GET", "/api/jobs/logs", {"token": token, "offset": offset,
                                                         "wait": f"{min(remaining, 5):.2f}"})
        seen += answer.text
        offset = int(answer.headers["X-Log-Offset"])
        if answer.headers["X-Job-Complete"] == "true" and text not in seen:
            raise AssertionError(f"job {token} ended without logging {text!r}; log: {seen!r}")
    return seen


# The names the real-server tests knew these by.
status_word, logs = status_of, logs_of


#
# The command line in this process: app.main([...]).
#


@pytest.fixture
def run_main(capsys):
    """run_main(*args) -> (exit code, stdout, stderr) of app.main(args) in this process, for start-ups that
    fail (one that succeeds would serve until a signal). main() sends its events through a logging handler of
    its own: the "jobserver" logger is put back as it was afterwards."""
    logger = logging.getLogger("jobserver")
    saved = logger.handlers[:], logger.level, logger.propagate

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = server_module.main(list(args))
        except SystemExit as exit:  # argparse: --help, and options it refuses
            code = exit.code
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    handlers, level, logger.propagate = saved
    logger.handlers[:] = handlers
    logger.setLevel(level)


def assert_one_clear_line(code: int, out: str, err: str, *needles: str) -> str:
    """A start-up that fails: exit code 2, nothing served, one line on stderr naming each needle."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert out == "", "nothing may be served"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.py: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


#
# A real `python app.py`.
#


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

    def request(self, method, path, params=None, body=None, headers=None, timeout=90):
        """(status, body text, headers dict) of one request on a new connection; a dict or list of pairs as
        the body is sent form-encoded."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            url = path + ("?" + urllib.parse.urlencode(params) if params else "")
            if isinstance(body, (dict, list)):
                body = urllib.parse.urlencode(body)
                headers = {"Content-Type": FORM, **(headers or {})}
            connection.request(method, url, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read().decode("utf-8"), dict(response.getheaders())
        finally:
            connection.close()

    def get(self, path, **params):
        return self.request("GET", path, params)

    def trigger(self, template, **variables):
        return trigger(self, template, **variables)

    def final_status(self, token, timeout=30, key=None):
        return final_status(self, token, key=key, timeout=timeout)

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


#
# Jobs the real-server tests share: scripts that write their pids and wait on a gate file in the test's
# directory, given to them as $Dir.
#

HELLO = '[hello]\nallow_new_variables = true\n[[hello.steps]]\nlog = "hi"\n\n'
GATE = 'echo started; while [ ! -e "$Dir/go" ]; do sleep 0.02; done'  # until the test creates $Dir/go
# A job that leaves a child and a grandchild running, with their pids in $Dir/child and $Dir/grandchild.
FAMILY = 'sleep 300 & echo $! > "$Dir/grandchild"; echo $$ > "$Dir/child"; echo started; {then}'


def dir_template(name: str, run: str, after: str = "", fields: str = "", **variables) -> str:
    """A template whose run step gets the test's directory as $Dir; `after` is TOML that follows the run step
    (more of its fields, more steps), `fields` TOML of the template's own fields (max_concurrent = 1),
    `variables` more variables as TOML values."""
    names = "".join(f"{variable} = {value}\n" for variable, value in {"Dir": '""', **variables}.items())
    own = f"{fields}\n" if fields else ""
    return f"[{name}]\n{own}[{name}.variables]\n{names}[[{name}.steps]]\nrun = \'\'\'{run}\'\'\'\n{after}\n"


# What start_server passes unless a test passes its own value of the option:
# --max-followers 32: each start makes --http-threads + --max-followers waitress threads, and the default
#   1,000 make every start and stop slower; a test of followers passes its own value.
# --grace 0.5: a test that fails half-way, with jobs still running, still tears down in a second.
SERVER_DEFAULTS = {"--max-followers": "32", "--grace": "0.5"}


@pytest.fixture
def start_server(tmp_path):
    """start_server(templates_toml, *args, db=None, directory=None) -> a started ServerProcess, stopped after
    the test; SERVER_DEFAULTS come before `args` for each option that `args` leaves out."""
    servers = []

    def start(templates: str, *args: str, db=None, directory=None):
        directory = directory or tmp_path / f"server{len(servers)}"
        directory.mkdir(exist_ok=True)
        defaults = [part for option, value in SERVER_DEFAULTS.items() if option not in args
                    for part in (option, value)]
        server = ServerProcess(directory, templates, *defaults, *args, db=db or tmp_path / "jobs.db")
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


class KeepAliveClient:
    """One reused HTTP connection to a real server; counts how often it had to (re)connect."""

    def __init__(self, port, timeout=60):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.connects = 0

    def get(self, path, **params) -> Answer:
        if self.connection.sock is None:
            self.connects += 1
        self.connection.request("GET", path + "?" + urllib.parse.urlencode(params))
        response = self.connection.getresponse()
        return Answer(response.status, response.read().decode("utf-8"), dict(response.getheaders()))

    def close(self):
        self.connection.close()


def run_threads(count, target, timeout):
    """Run target(index) on `count` threads; returns the exceptions they raised."""
    failures = []

    def guarded(index):
        try:
            target(index)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"client threads still running after {timeout} s"
    return failures

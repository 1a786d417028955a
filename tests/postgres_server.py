"""A throwaway PostgreSQL server for the tests and the benchmark: initdb into a temporary directory, run it.

    from postgres_server import PostgresServer, missing_postgres_message

    @pytest.fixture(scope="session")
    def postgres():
        if missing_postgres_message():
            pytest.skip(missing_postgres_message())
        with PostgresServer() as server:      # stopped and removed at the end, even if tests fail
            yield server

    def test_x(postgres):
        postgres.create_database("t1")
        connect_to(postgres.url("t1"))

Why a private server rather than the system's cluster: it needs no service manager (CI containers have no
systemd, and Debian's packaging does not start its cluster there), no password, no state left by a previous
run, and it does not collide with a cluster that may already listen on 5432, because it listens on a free port
of 127.0.0.1 and puts its unix socket in its own directory. The superuser is `postgres`, with trust
authentication, so `url(dbname)` needs no password.

The settings default to "fast and not durable" (TEST_SETTINGS: no fsync, no synchronous commit), which is
what tests want; the benchmark passes DURABLE_SETTINGS (or any `-c name=value` settings) to measure
real commit costs. Only the standard library and psycopg 3 are used.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import psycopg
from psycopg import sql

INSTALL_HINT = "PostgreSQL is not installed: apt-get install postgresql (Debian package postgresql)"

# Fast, not crash-safe: a test database never has to survive a power cut. max_connections is high because
# several app instances each hold a connection pool, and tests open more connections of their own.
TEST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "listen_addresses": "127.0.0.1",
}

# What a production server does on commit; pass settings=DURABLE_SETTINGS to measure commit latency.
DURABLE_SETTINGS: dict[str, str] = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}

# A unix socket path (directory + "/.s.PGSQL.NNNNN") must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_DIR = 90

_SHUTDOWN_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class PostgresServerError(RuntimeError):
    """The server could not be set up, started or stopped; the message ends with its log when it has one."""


def _version_key(directory: Path) -> tuple[int, ...]:
    """Sort key of /usr/lib/postgresql/<version>: numeric, so that 9.6 < 10 < 15 (not as strings)."""
    return tuple(int(part) for part in re.findall(r"\d+", directory.parent.name)) or (0,)


def find_postgres() -> Optional[str]:
    """The directory holding initdb and postgres, or None when PostgreSQL's server is not installed.

    $PG_BIN wins when set (and is then the only place looked at, so a wrong value is noticed rather than
    silently replaced). Otherwise the highest version under Debian's /usr/lib/postgresql/*/bin, which is not
    on PATH; then PATH itself (other distributions and Homebrew put initdb there).
    """
    def has_server(directory: Path) -> bool:
        return all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres"))

    explicit = os.environ.get("PG_BIN")
    if explicit:
        return str(Path(explicit)) if has_server(Path(explicit)) else None
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for directory in debian:
        if has_server(directory):
            return str(directory)
    initdb = shutil.which("initdb")
    if initdb and has_server(Path(initdb).resolve().parent):
        return str(Path(initdb).resolve().parent)
    return None


def missing_postgres_message() -> Optional[str]:
    """None when a server can be started, else a message saying what to install (for pytest.skip or exit)."""
    if find_postgres():
        return None
    explicit = os.environ.get("PG_BIN")
    if explicit:
        return f"PG_BIN={explicit} holds no initdb and postgres; unset it or fix it. {INSTALL_HINT}"
    return INSTALL_HINT


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the server retries with another if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unprivileged_user() -> Optional[pwd.struct_passwd]:
    """The account to run initdb and postgres as, or None to run them as ourselves.

    initdb and postgres refuse to run as root. As root we use $PG_USER, else `postgres` (Debian's package
    creates it), else `nobody`; any of them only needs to own the temporary directory.
    """
    if os.geteuid() != 0:
        return None
    names = [os.environ["PG_USER"]] if os.environ.get("PG_USER") else ["postgres", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresServerError(f"running as root and no user {' or '.join(names)} to run PostgreSQL as")


class PostgresServer:
    """One private PostgreSQL server: its own data directory, port and socket directory, all temporary.

    start() runs initdb (first time only) and the server; stop() shuts it down and removes every file.
    shutdown()/start() and restart() keep the data and the port, so that clients configured with url() can
    reconnect: the tests take PostgreSQL away under load. Usable as a context manager; servers still running
    at interpreter exit are stopped by an atexit hook, in case a caller never reached stop().
    """

    def __init__(self, settings: Optional[Mapping[str, Optional[str]]] = None, *,
                 bin_dir: Optional[str] = None, timeout: float = 60.0):
        """settings: `-c name=value` settings over TEST_SETTINGS; a value None drops a default setting.

        timeout bounds each wait (initdb, readiness, shutdown); crash recovery after an immediate shutdown
        with fsync on is the slowest of them.
        """
        self.bin_dir = bin_dir or find_postgres()
        if not self.bin_dir:
            raise PostgresServerError(missing_postgres_message() or INSTALL_HINT)
        merged = {**TEST_SETTINGS, **(settings or {})}
        self.settings = {name: str(value) for name, value in merged.items() if value is not None}
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.base_dir: Optional[Path] = None  # holds data/, the log and the unix socket
        self._process: Optional[subprocess.Popen] = None
        self._user = _unprivileged_user()
        self._admin: Optional[psycopg.Connection] = None
        self._lock = threading.RLock()

    # -- paths and addresses ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base()

    @property
    def log_path(self) -> Path:
        return self._base() / "postgres.log"

    def _base(self) -> Path:
        if self.base_dir is None:
            raise PostgresServerError("the server has not been started")
        return self.base_dir

    def url(self, dbname: str = "postgres") -> str:
        """The TCP URL of a database, as the app takes it: postgresql://postgres@127.0.0.1:PORT/dbname."""
        if self.port is None:
            raise PostgresServerError("the server has not been started")
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def socket_url(self, dbname: str = "postgres") -> str:
        """The same database over the unix socket (cheaper per connection than TCP)."""
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """The server's log so far (stderr of initdb and postgres), '' when there is none."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, PostgresServerError):
            return ""

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> "PostgresServer":
        """Run initdb (first time only), then the server; return once it accepts connections."""
        with self._lock:
            if self.running:
                return self
            if self.base_dir is None:
                _LIVE.add(self)
                try:
                    self._initdb()
                except BaseException:
                    self.stop()
                    raise
            first_start = self.port is None
            for attempt in range(3):
                if first_start:
                    self.port = _free_port()
                try:
                    self._launch()
                    return self
                except PostgresServerError:
                    # Another process may have taken the free port between probe and bind; only the first
                    # start may move to another port, later ones must keep the one clients know.
                    if not (first_start and attempt < 2 and "could not bind" in self.log_text()):
                        if first_start:
                            self.stop()
                        raise
            raise AssertionError("unreachable")

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server but keep its data, port and directory; start() brings it back.

        mode: "fast" (roll back and disconnect clients; the default), "smart" (wait for clients to leave),
        "immediate" (no checkpoint: the next start does crash recovery, like after a power cut).
        """
        with self._lock:
            self._close_admin()
            process, self._process = self._process, None
            if process is not None:
                self._terminate(process, _SHUTDOWN_SIGNALS[mode])

    def restart(self, mode: str = "fast", downtime: float = 0.0) -> None:
        """shutdown(mode), stay down for `downtime` seconds, start() again on the same port and data."""
        with self._lock:
            self.shutdown(mode)
            if downtime > 0:
                time.sleep(downtime)  # the outage itself, which the caller asked for: not a wait for a state
            self.start()

    def stop(self) -> None:
        """Fast shutdown, then remove the temporary directory: no process and no file is left behind."""
        with self._lock:
            try:
                self.shutdown("fast")
            finally:
                _LIVE.discard(self)
                if self.base_dir is not None:
                    shutil.rmtree(self.base_dir, ignore_errors=True)
                    if self.base_dir.exists():
                        raise PostgresServerError(f"could not remove {self.base_dir}")
                    self.base_dir = None
                self.port = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _initdb(self) -> None:
        parent = tempfile.gettempdir()
        if len(parent) > _MAX_SOCKET_DIR - 20:
            parent = "/tmp"  # a long $TMPDIR would make the socket path too long for sun_path
        self.base_dir = Path(tempfile.mkdtemp(prefix="pgtest-", dir=parent))
        if self._user is not None:
            os.chown(self.base_dir, self._user.pw_uid, self._user.pw_gid)
        # --no-sync: nothing to gain from flushing a throwaway cluster's files (saves most of initdb's time).
        # --no-locale/UTF8: the same collation everywhere, whatever the machine's locale is.
        self._run([str(Path(self.bin_dir) / "initdb"), "-D", str(self.data_dir), "--username=postgres",
                   "--auth=trust", "--no-locale", "--encoding=UTF8", "--no-sync", "--no-instructions"],
                  what="initdb")

    def _child_kwargs(self) -> dict[str, Any]:
        """Popen arguments shared by initdb and postgres: who runs them, where, with what environment."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"  # server messages in English, whatever the caller's locale
        kwargs: dict[str, Any] = {"cwd": str(self._base()), "env": env, "stdin": subprocess.DEVNULL}
        if self._user is not None:
            # extra_groups=[] drops root's supplementary groups too, not just the uid and gid.
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return kwargs

    def _run(self, command: Sequence[str], what: str) -> None:
        with open(self.log_path, "ab") as log:
            try:
                subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True,
                               timeout=self.timeout, **self._child_kwargs())
            except (subprocess.SubprocessError, OSError) as error:
                raise PostgresServerError(f"{what} failed: {error}\n{self.log_text()}") from None

    def _launch(self) -> None:
        """Start postgres itself (not pg_ctl, so we hold its pid) and wait until it accepts a connection."""
        command = [str(Path(self.bin_dir) / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                   "-c", f"unix_socket_directories={self.socket_dir}"]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C aimed at pytest does not also hit the server (the fixture stops
            # it), and the whole process group can be killed if the postmaster ever dies uncleanly.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, **self._child_kwargs())
        deadline = time.monotonic() + self.timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._terminate(self._process, signal.SIGQUIT)
                self._process = None
                raise PostgresServerError(f"postgres exited with status {code} while starting:\n"
                                          + self.log_text()[offset:])
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=5):
                    return
            except psycopg.OperationalError:
                pass  # not listening yet, or "the database system is starting up"
            if time.monotonic() > deadline:
                self._terminate(self._process, signal.SIGQUIT)
                self._process = None
                raise PostgresServerError(f"postgres not ready after {self.timeout} s:\n"
                                          + self.log_text()[offset:])
            time.sleep(0.01)  # poll interval

    def _terminate(self, process: subprocess.Popen, sig: int) -> None:
        """Signal the postmaster, wait for it, and make sure no process of its group survives.

        The postmaster waits for its children in every shutdown mode; only if it has to be SIGKILLed (it
        did not finish in time) could backends outlive it, so the group is then killed and waited for.
        """
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                raise PostgresServerError(f"processes of group {process.pid} survive the server's shutdown")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.01)

    # -- SQL as the superuser --------------------------------------------------------------------------

    def _close_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection:
        """A new autocommit connection as the superuser; the caller closes it (use it in a `with`)."""
        return psycopg.connect(self.url(dbname), autocommit=True, **kwargs)

    def execute(self, query: Any, params: Optional[Sequence[Any]] = None, dbname: str = "postgres"
                ) -> list[tuple]:
        """Run one statement as the superuser, in autocommit; return its rows ([] when it returns none).

        Statements on the `postgres` database reuse one connection (closed by shutdown(), reopened when
        found broken), so per-test CREATE/DROP DATABASE costs no connection setup; other databases get a
        fresh connection each time. query may be a str or a psycopg.sql.Composable.
        """
        if dbname != "postgres":
            with self.connect(dbname) as connection:
                cursor = connection.execute(query, params)
                return cursor.fetchall() if cursor.description else []
        with self._lock:
            if self._admin is None or self._admin.broken or self._admin.closed:
                self._close_admin()
                self._admin = self.connect("postgres")
            cursor = self._admin.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str, template: Optional[str] = None, strategy: Optional[str] = None
                        ) -> str:
        """CREATE DATABASE name [TEMPLATE template] [STRATEGY strategy]; returns url(name).

        strategy: None (PostgreSQL 15's default, WAL_LOG) or "FILE_COPY", which copies the files and is
        faster for small databases when fsync is off. A template must have no open connections.
        """
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        if strategy:
            query += sql.SQL(" STRATEGY {}").format(sql.Identifier(strategy.lower()))
        self.execute(query)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ... WITH (FORCE): connections still open to it are terminated first."""
        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def terminate_backends(self, application_name: Optional[str] = None, *, dbname: Optional[str] = None,
                           query: Optional[str] = None) -> int:
        """pg_terminate_backend() every client connection matching all the filters given; return how many.

        application_name and dbname match exactly; query is a substring of the backend's current or *last*
        statement (pg_stat_activity.query). To single out a LISTEN connection prefer application_name (set it
        when connecting): query="LISTEN" only matches while LISTEN was its last statement, which stops being
        true once it runs anything else (even a COMMIT). With no filter every client connection but our own
        is terminated.
        """
        conditions = [sql.SQL("backend_type = 'client backend'"), sql.SQL("pid <> pg_backend_pid()")]
        params: list[Any] = []
        if application_name is not None:
            conditions.append(sql.SQL("application_name = %s"))
            params.append(application_name)
        if dbname is not None:
            conditions.append(sql.SQL("datname = %s"))
            params.append(dbname)
        if query is not None:
            conditions.append(sql.SQL("strpos(query, %s) > 0"))
            params.append(query)
        query_sql = sql.SQL("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                            " FROM pg_stat_activity WHERE {}").format(sql.SQL(" AND ").join(conditions))
        rows = self.execute(query_sql, params)
        return rows[0][0]


_LIVE: set[PostgresServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Stop servers whose owner never called stop() (an interrupted run): no orphan postgres, no temp dir."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


@contextlib.contextmanager
def postgres_server(settings: Optional[Mapping[str, Optional[str]]] = None, **kwargs: Any
                    ) -> Iterator[PostgresServer]:
    """`with postgres_server() as server:` a started server, stopped and removed on the way out."""
    with PostgresServer(settings, **kwargs) as server:
        yield server


if __name__ == "__main__":
    # Self-test: python tests/postgres_server.py
    message = missing_postgres_message()
    if message:
        raise SystemExit(message)
    began = time.monotonic()
    server = PostgresServer()
    with server:
        print(f"started {server.bin_dir} on port {server.port} in {time.monotonic() - began:.2f} s"
              f" (running as {server._user.pw_name if server._user else 'current user'})")
        url = server.create_database("selftest")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        port = server.port
        server.restart()
        assert server.port == port
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(url, application_name="victim") as victim:
            assert server.terminate_backends("victim") == 1
            try:
                victim.execute("SELECT 1")
                raise AssertionError("terminated connection still works")
            except psycopg.OperationalError:
                pass
        server.drop_database("selftest")
        pid, base = server._process.pid, server.base_dir
    assert not base.exists(), base
    try:
        os.killpg(pid, 0)
        raise AssertionError(f"process group {pid} survives")
    except ProcessLookupError:
        pass
    print("self-test passed: create, SELECT 1, restart on the same port, SELECT 1, terminate, stop;"
          " no process or directory left")

"""Benchmark of the job orchestration server: every figure is a ratio against a baseline run side by side.

    python tests/benchmark.py                 # the full run (about 5.5 minutes on 2 cores)
    python tests/benchmark.py --quick         # smaller counts, a smoke run (about 1 minute)
    python tests/benchmark.py --only 1,3      # some figures only (4, 5 and 10 share one job; 6 and 9 one database)
    python tests/benchmark.py --py-spy DIR    # also record each app.py server with py-spy (raw stacks)

It starts real `python app.py` processes on 127.0.0.1 (port 0), each with its own temporary templates and
database, measures them and a baseline in the same run on the same machine, and prints one table:
figure | ours | baseline | ratio | target | met?. The figures:

     1  trigger requests/s, 16 keep-alive connections, one `log` step; baseline: a Flask constant on waitress
     2  jobs completed/s, 2,000 x `run = "true"`, 4 workers; baseline: 4 threads spawning `sh -c true`
     3  trigger to final status on an idle server, p50 and p99; baseline: `sh -c true` run directly
     4  log lines stored/s by a job printing 1,000,000 lines; baseline: the same command into /dev/null
     5  RSS growth while serving that log (GET /api/jobs/logs); baseline: the RSS before
     6  status lookups/s with 1,000,000 jobs in the database; baseline: the same with 1,000
     7  webhook (a Go peer) where it is installed: its async trigger and sync completion rates beside ours
     8  trigger p50/p99 while 1,000 followers hold `status?wait=30` on a running job, against none; the RSS
     9  p50 of the pages `/` and `/jobs/<token>` with 1,000,000 jobs in the database, against /api/jobs/status
    10  the job page of figure 4's 1,000,000-entry log: time, size and RSS growth
    11  PostgreSQL (fsync on, synchronous_commit off) against SQLite, one instance each: triggers/s, jobs/s
        and trigger-to-final p50; and two instances sharing a port (--reuse-port) against one, on PostgreSQL
    12  figure 1 with event lines (--log-level info, the default) against without (--log-level warning)

HTTP load comes from `wrk` (Debian package wrk) when it is installed (install: apt-get install wrk), else
from a Python keep-alive client (threads + http.client; also --no-wrk), which costs more client CPU on the
same cores, so its figures are lower bounds. Where `webhook` (Debian package webhook) is installed, its async
trigger rate and synchronous completion rate are printed beside ours. Figure 11 needs PostgreSQL's server
(Debian package postgresql) and psycopg; without them it prints a note and no rows.

Throughput figures alternate ours and the baseline for several rounds and keep the best of each, because
other load on a shared machine only ever slows a round down. The notes under the table give counts, errors,
the server's CPU time and context switches per request, and for figure 2 the CPU time per job of every process
involved (server, its `sh` processes, the load client) beside the baseline's, with the cores they kept busy.
Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
HTTP_THREADS = 16  # app.py's --http-threads default; the Flask baseline gets the same
WORKERS = 4  # app.py's --workers default
FINAL = ("Succeeded", "Warning", "Error")
FIGURES = range(1, 13)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

CHILDREN: list[subprocess.Popen] = []  # every process started here, stopped in main's finally
NOTES: list[str] = []
ROWS: list[tuple[str, str, str, str, str, str]] = []


def note(text: str) -> None:
    NOTES.append(text)
    print(f"  .. {text}", file=sys.stderr, flush=True)


def row(figure: str, ours: str, baseline: str, ratio: str, target: str, met) -> None:
    met_text = "-" if met is None else ("yes" if met else "NO")
    ROWS.append((figure, ours, baseline, ratio, target, met_text))


def is_url(database: str) -> bool:
    return str(database).startswith(("postgresql:", "postgres:"))


#
# Child processes.
#


class Child:
    """A server process on loopback: app.py, the Flask baseline or webhook."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int | None = None):
        self.name, self.argv, self.workdir = name, argv, workdir
        self.port = port
        self.instance: str | None = None  # app.py's instance id, from its first line
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.profiler: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 30.0, announce: bool = True) -> "Child":
        """Start it; with announce, the first stdout line is "Serving on http://127.0.0.1:PORT (..., instance: ID)"."""
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE if announce else self.log_file, stderr=self.log_file,
            stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True,
        )
        CHILDREN.append(self.process)
        deadline = time.monotonic() + timeout
        if announce:
            line = b""
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")
                if select.select([self.process.stdout], [], [], remaining)[0]:
                    chunk = os.read(self.process.stdout.fileno(), 1)
                    if not chunk:
                        raise RuntimeError(f"{self.name} closed its stdout: {self.log_tail()}")
                    line += chunk
            match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
            if not match:
                raise RuntimeError(f"{self.name}: unexpected first line {line!r}")
            self.port = int(match.group(1))
            instance = re.search(rb"instance: ([^\s),]+)", line)
            self.instance = instance.group(1).decode() if instance else None
            # Keep draining stdout so that the child never blocks on a full pipe.
            threading.Thread(target=self._drain, daemon=True).start()
        else:
            while True:  # wait until it accepts connections
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}") from None
                    time.sleep(0.02)
        return self

    def _drain(self) -> None:
        try:
            while os.read(self.process.stdout.fileno(), 65536):
                pass
        except (OSError, ValueError):
            pass

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def log_size(self) -> int:
        """Bytes the process wrote to stderr so far (app.py's event lines)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def profile(self, directory: Path | None, label: str) -> None:
        """Attach py-spy (raw collapsed stacks, per thread) until stop(); no-op without --py-spy."""
        if directory is None or not shutil.which("py-spy"):
            return
        output = directory / f"{label}.txt"
        self.profiler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.pid), "--rate", "100", "--nonblocking", "--threads", "--format", "raw",
             "--output", str(output)],
            stdout=subprocess.DEVNULL, stderr=open(directory / f"{label}.py-spy.log", "ab"),
            stdin=subprocess.DEVNULL,
        )
        CHILDREN.append(self.profiler)
        time.sleep(0.5)  # let it attach before the load starts

    def stop(self, timeout: float = 20.0) -> None:
        if self.profiler is not None and self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)
            try:
                self.profiler.wait(15)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
        stop_process(self.process, timeout)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        if getattr(self, "log_file", None):
            self.log_file.close()


def stop_process(process: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class App(Child):
    """A real `python app.py` with its own templates file in a directory of its own, and its database: a
    jobs.db there, another SQLite file, or a postgresql:// URL."""

    def __init__(self, workdir: Path, name: str, templates: str, *args: str, db: Path | str | None = None,
                 port: int = 0):
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        self.templates = directory / "templates.toml"
        self.templates.write_text(textwrap.dedent(templates))
        self.database = str(db or directory / "jobs.db")
        argv = [sys.executable, str(APP), "--host", "127.0.0.1", "--port", str(port), "--templates",
                str(self.templates), "--db", self.database, "--grace", "5", *args]
        super().__init__(name, argv, directory)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads), from /proc; or, with children, that of its
    children it has reaped (a server's job processes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / CLOCK_TICKS


def tree_cpu_seconds(parent: int) -> float:
    """CPU time of a process, of its live children, and of the children it reaped: PostgreSQL's postmaster and
    its backends (each backend is a session of its own, so a process group would miss them)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(parent):
            total += sum(int(field) for field in fields[11:15])
        elif int(fields[1]) == parent:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def own_cpu_seconds() -> tuple[float, float]:
    """CPU time of this benchmark process, and of the children it has reaped (wrk, `sh` in a baseline)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def machine_busy_seconds() -> float:
    """CPU time all the machine's cores spent busy since boot (not idle, not waiting for I/O), from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of a process's threads so far, from /proc: under
    load, the hand-offs of the interpreter lock between threads show up here."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            total += sum(int(line.split()[1]) for line in status.read_text().splitlines() if "ctxt_switches" in line)
        except (OSError, ValueError):
            pass  # a thread that ended meanwhile
    return total


def memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads of a process, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0]) * 1024
        elif line.startswith("Threads:"):
            fields["Threads"] = int(line.split()[1])
    return fields


class PeakMemory:
    """The RSS of a process before a block and its peak during the block: polled every 5 ms, and the kernel's
    own peak (VmHWM), which is reset to the current RSS first where /proc/PID/clear_refs allows."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> "PeakMemory":
        time.sleep(0.2)  # what the server did just before settles (memory is read, nothing waits on it)
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.before = memory(self.pid)
        self.polled = self.before["VmRSS"]
        self.done = threading.Event()
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()
        return self

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                self.polled = max(self.polled, memory(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            self.done.wait(0.005)

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.poller.join(5)
        self.after = memory(self.pid)
        self.peak = max(self.polled, self.after["VmHWM"] if self.reset else 0)
        self.growth = self.peak - self.before["VmRSS"]

    def text(self) -> str:
        return (f"RSS before {self.before['VmRSS'] / 1e6:.1f} MB, peak {self.peak / 1e6:.1f} MB (polled "
                f"{self.polled / 1e6:.1f}, VmHWM {'reset' if self.reset else 'not reset'} "
                f"{self.after['VmHWM'] / 1e6:.1f}), after {self.after['VmRSS'] / 1e6:.1f} MB")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raise_open_files(wanted: int) -> None:
    """Raise this process's RLIMIT_NOFILE soft limit to `wanted` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def connections_per_server(servers: list[Child], port: int) -> list[int]:
    """How many ESTABLISHED TCP connections on local port `port` each server process holds (from /proc):
    how the kernel spread a load's connections over instances that share the port."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                established.add(fields[9])
    counts = []
    for server in servers:
        inodes = set()
        for fd in Path(f"/proc/{server.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        counts.append(len(inodes & established))
    return counts


#
# Job stores, read beside the server.
#


class StoreReader:
    """A connection that reads a server's job store while it runs: read-only on a SQLite file (WAL: never in
    the server's way), autocommit on PostgreSQL (psycopg)."""

    def __init__(self, database: str):
        if is_url(database):
            import psycopg

            self.connection = psycopg.connect(database, autocommit=True, connect_timeout=10)
        else:
            self.connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)

    def all(self, statement: str) -> list[tuple]:
        return self.connection.execute(statement).fetchall()

    def value(self, statement: str):
        return self.connection.execute(statement).fetchone()[0]

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def count_statuses(database: str) -> dict[str, int]:
    with StoreReader(database) as reader:
        return dict(reader.all("SELECT status, count(*) FROM jobs GROUP BY status"))


def owners(database: str, servers: list[Child]) -> str:
    """Which instance ran how many jobs, as "name N, name N"."""
    with StoreReader(database) as reader:
        counts = dict(reader.all("SELECT owner, count(*) FROM jobs GROUP BY owner"))
    return ", ".join(f"{server.name} {counts.get(server.instance, 0)}" for server in servers)


def build_database(path: Path, jobs: int, templates_path: Path, template: str) -> None:
    """A SQLite job store with `jobs` Succeeded jobs (tokens 1..jobs) of `template`, each with one log entry.

    The app's own store code makes the file (app.open_store: schema.sql, PRAGMA user_version = SCHEMA_VERSION)
    and stores the template's version as a server would (its digest filled in), so that a server starts on
    the file as it is; then one transaction inserts the jobs and their entries, in SQLite's own loop (a
    recursive CTE) with the journal in memory and no syncs, which is what keeps 1,000,000 jobs under 10 s."""
    sys.path.insert(0, str(ROOT))
    try:
        import app as jobserver
    finally:
        sys.path.remove(str(ROOT))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    spec = jobserver.load_templates(templates_path)[template]
    store = jobserver.open_store(str(path))
    try:
        version = store.save_template_version(spec.name, spec.definition, spec.key_digest)
    finally:
        store.close()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = MEMORY")  # leaves WAL mode for the bulk insert only
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("PRAGMA cache_size = -262144")  # 256 MiB
        connection.execute("BEGIN")
        now = time.time()
        connection.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO jobs (id, template_version, template, status, variables, created_at, started_at,"
            " finished_at) SELECT i, ?, ?, 'Succeeded', '{}', ?, ?, ? FROM n",
            (jobs, version, spec.name, now - 2, now - 1, now))
        connection.execute("INSERT INTO logs (job_id, seq, level, message) SELECT id, 0, 'INFO', 'hello' FROM jobs")
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode = WAL")
        version_found = connection.execute("PRAGMA user_version").fetchone()[0]
    finally:
        connection.close()
    if version_found != jobserver.SCHEMA_VERSION:
        raise RuntimeError(f"built a database of schema version {version_found}, app.py has {jobserver.SCHEMA_VERSION}")


#
# HTTP clients.
#


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, port: int, timeout: float = 70.0):
        self.port, self.timeout = port, timeout
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.size = 0  # bytes of the last response's body

    def get(self, path: str, params: dict | None = None) -> tuple[int, str, dict]:
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        for attempt in (1, 2):
            try:
                self.connection.request("GET", url)
                response = self.connection.getresponse()
                raw = response.read()
                self.size = len(raw)
                if response.will_close:
                    self.connection.close()
                return response.status, raw.decode("utf-8", "replace"), {k.lower(): v for k, v in response.getheaders()}
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def timed(self, path: str, expect: int = 200) -> float:
        """GET path; the milliseconds until its whole answer was read."""
        start = time.perf_counter()
        code, body, _ = self.get(path)
        elapsed = (time.perf_counter() - start) * 1000
        if code != expect:
            raise RuntimeError(f"GET {path}: HTTP {code} {body[:200]!r}")
        return elapsed

    def close(self) -> None:
        self.connection.close()


def http_load(port: int, paths, connections: int, duration: float, use_wrk: bool, workdir: Path,
              label: str, during=None) -> dict:
    """Keep `connections` keep-alive connections busy for `duration` seconds; `during()` is called once,
    half-way through.

    paths is a fixed path or ("random-token", n) for /api/jobs/status?token=<random 1..n>.
    Returns {"rate": requests/s, "requests": n, "errors": non-2xx + socket errors, "tool": "wrk"|"python"}."""
    timer = threading.Timer(duration / 2, during) if during else None
    if timer:
        timer.start()
    try:
        if use_wrk:
            return wrk_load(port, paths, connections, duration, workdir, label)
        return python_load(port, paths, connections, duration)
    finally:
        if timer:
            timer.join()


def wrk_load(port: int, paths, connections: int, duration: float, workdir: Path, label: str) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
    if isinstance(paths, tuple):
        _, count = paths
        script = workdir / f"{label}.lua"
        script.write_text(textwrap.dedent(f"""\
            math.randomseed({12345 + count})
            request = function()
              return wrk.format("GET", "/api/jobs/status?token=" .. math.random(1, {count}))
            end
            """))
        argv += ["-s", str(script), f"http://127.0.0.1:{port}/"]
    else:
        argv.append(f"http://127.0.0.1:{port}{paths}")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    output = result.stdout + result.stderr
    (workdir / f"{label}.wrk.txt").write_text(" ".join(argv) + "\n" + output)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if result.returncode != 0 or not rate or not total:
        raise RuntimeError(f"wrk failed ({result.returncode}): {output[-500:]}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s*(\d+)", output))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return {"rate": float(rate.group(1)), "requests": int(total.group(1)), "errors": errors, "tool": "wrk"}


def python_load(port: int, paths, connections: int, duration: float) -> dict:
    counts, errors = [0] * connections, [0] * connections
    start = time.monotonic()
    deadline = start + duration

    def worker(index: int) -> None:
        rng = random.Random(12345 + index)
        connection = Connection(port, timeout=30)
        try:
            while time.monotonic() < deadline:
                if isinstance(paths, tuple):
                    path = f"/api/jobs/status?token={rng.randint(1, paths[1])}"
                else:
                    path = paths
                try:
                    status, _, _ = connection.get(path)
                except OSError:
                    errors[index] += 1
                    continue
                counts[index] += 1
                if not 200 <= status < 300:
                    errors[index] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 60)
    elapsed = time.monotonic() - start
    return {"rate": sum(counts) / elapsed, "requests": sum(counts), "errors": sum(errors), "tool": "python"}


def wait_final(connection: Connection, token: str, limit: float) -> str:
    """status?wait= until the job is final or `limit` seconds passed; the last status seen."""
    deadline = time.monotonic() + limit
    while True:
        remaining = deadline - time.monotonic()
        code, body, _ = connection.get("/api/jobs/status", {"token": token, "wait": f"{max(0.0, min(remaining, 30)):.3f}"})
        if code != 200:
            raise RuntimeError(f"status of job {token}: HTTP {code} {body[:200]}")
        if body in FINAL or remaining <= 0:
            return body


def trigger(connection: Connection, template: str) -> str:
    code, body, _ = connection.get("/api/jobs/trigger", {"template": template})
    if code != 200 or not body.isdigit():
        raise RuntimeError(f"trigger {template}: HTTP {code} {body[:200]}")
    return body


def metric(connection: Connection, name: str) -> float | None:
    """One unlabelled value of the server's /metrics, or None when it is not there."""
    code, body, _ = connection.get("/metrics")
    if code != 200:
        raise RuntimeError(f"/metrics: HTTP {code} {body[:200]}")
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else None


#
# Formatting.
#


def fmt(value: float, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def ratio_text(ours: float, baseline: float) -> str:
    return f"{ours / baseline:.2f}" if baseline else "-"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def best_of(results: list[dict]) -> dict:
    return max(results, key=lambda r: r["rate"])


def log_bytes(lines: int) -> int:
    """Bytes of the log of `seq LINES` as /api/jobs/logs serves it ("INFO: N\\n" per line)."""
    return sum(len("INFO: \n") + len(str(n)) for n in range(1, lines + 1))


#
# Figures.
#

LOG_TEMPLATE = '''
[logjob]
description = "One log step"
[[logjob.steps]]
log = "hello"
'''

TRUE_TEMPLATE = '''
[truejob]
description = "Runs true"
[[truejob.steps]]
run = "true"
'''

SLEEP_TEMPLATE = '''
[sleeper]
description = "Runs for a minute"
[[sleeper.steps]]
run = "sleep 60"
'''

FLASK_BASELINE = '''
import sys
from flask import Flask, Response
from waitress import create_server

app = Flask(__name__)


@app.route("/api/jobs/trigger", methods=["GET", "POST"])
def trigger():
    return Response("1", mimetype="text/plain")


server = create_server(app, host="127.0.0.1", port=0, threads=int(sys.argv[1]), ident="")
print(f"Serving on http://127.0.0.1:{server.effective_port} (flask baseline)", flush=True)
server.run()
'''

# Figure 1's server: as app.py's defaults, but a queue that never refuses a trigger during the load.
TRIGGER_ARGS = ("--workers", str(WORKERS), "--http-threads", str(HTTP_THREADS), "--max-pending", "10000000")
TRIGGER_PATH = "/api/jobs/trigger?template=logjob"

# Figure 11's PostgreSQL: the durability of SQLite's WAL with synchronous=NORMAL, as app.py runs it.
POSTGRES_SETTINGS = {"fsync": "on", "synchronous_commit": "off", "full_page_writes": "on"}


class Bench:
    def __init__(self, options, workdir: Path):
        self.options, self.workdir = options, workdir
        self.quick = options.quick
        self.use_wrk = bool(shutil.which("wrk")) and not options.no_wrk
        self.duration = 2.0 if self.quick else 4.0
        self.rounds = 1 if self.quick else 3
        self.large = 100_000 if self.quick else 1_000_000  # jobs in figure 6's and 9's database
        self.log_lines = 200_000 if self.quick else 1_000_000  # figure 4's job
        self.profile_dir = Path(options.py_spy) if options.py_spy else None
        if self.profile_dir:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.ours: dict[str, float] = {}  # figures the webhook rows compare against
        self.servers: list[Child] = []
        self.databases: dict[int, Path] = {}  # built job stores by size, shared by figures 6 and 9
        self.postgres_pid: int | None = None  # figure 11's PostgreSQL, whose CPU time the loads add up

    def app(self, name: str, templates: str, *args: str, db: Path | str | None = None, port: int = 0) -> App:
        server = App(self.workdir, name, templates, *args, db=db, port=port)
        self.servers.append(server)
        server.start()
        return server

    def instances(self, name: str, templates: str, args: tuple[str, ...], db: str | None = None,
                  count: int = 1) -> list[App]:
        """One server, or `count` servers on one database sharing one port (--reuse-port)."""
        if count == 1:
            return [self.app(name, templates, *args, db=db)]
        port = free_port()
        servers = []
        try:
            for number in range(count):
                servers.append(self.app(f"{name}-{number + 1}", templates, "--reuse-port", *args, db=db, port=port))
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers

    def load(self, servers, paths, connections: int, label: str, duration: float | None = None,
             during=None) -> dict:
        """HTTP load on a server (or servers sharing a port); adds the servers' CPU time ("cpu_us"), that of
        PostgreSQL when figure 11 runs ("db_us") and context switches ("switches") per request."""
        servers = servers if isinstance(servers, list) else [servers]
        pids = [server.pid for server in servers]
        before, switches_before = sum(map(cpu_seconds, pids)), sum(map(context_switches, pids))
        postgres = self.postgres_of(servers)
        db_before = tree_cpu_seconds(postgres) if postgres else 0.0
        result = http_load(servers[0].port, paths, connections, duration or self.duration, self.use_wrk,
                           self.workdir, label, during)
        requests = max(1, result["requests"])
        result["cpu_us"] = (sum(map(cpu_seconds, pids)) - before) / requests * 1e6
        result["switches"] = (sum(map(context_switches, pids)) - switches_before) / requests
        result["db_us"] = (tree_cpu_seconds(postgres) - db_before) / requests * 1e6 if postgres else None
        return result

    def postgres_of(self, servers: list[Child]) -> int | None:
        """The postmaster's pid when these servers run on figure 11's PostgreSQL."""
        if self.postgres_pid and any(is_url(getattr(server, "database", "")) for server in servers):
            return self.postgres_pid
        return None

    def database(self, size: int) -> Path:
        """A job store of `size` Succeeded jobs, built once per run (figures 6 and 9 share it)."""
        if size not in self.databases:
            path = self.workdir / f"status-{size}.db"
            templates = self.workdir / "status-templates.toml"
            templates.write_text(textwrap.dedent(LOG_TEMPLATE))
            start = time.perf_counter()
            build_database(path, size, templates, "logjob")
            note(f"built a database of {size:,} jobs (one log entry each) in {time.perf_counter() - start:.1f} s "
                 f"({path.stat().st_size / 1e6:.0f} MB)")
            self.databases[size] = path
        return self.databases[size]

    # Figure 1's method: trigger requests/s on fresh servers.

    def trigger_round(self, name: str, *args: str, db: str | None = None, count: int = 1,
                      profile: bool = False) -> dict:
        """wrk on 16 connections triggering a one-log-step job, on a fresh server (or `count` sharing a port),
        so that no backlog of an earlier round's jobs runs meanwhile. Adds the statuses right after, the
        first token, the connections each server held and the bytes of event lines per request."""
        servers = self.instances(name, LOG_TEMPLATE, TRIGGER_ARGS + args, db=db, count=count)
        try:
            connection = Connection(servers[0].port)
            first = trigger(connection, "logjob")
            connection.close()
            if profile:
                servers[0].profile(self.profile_dir, name)
            split: list[int] = []
            logged = sum(server.log_size() for server in servers)
            result = self.load(servers, TRIGGER_PATH, 16, name,
                               during=(lambda: split.extend(connections_per_server(servers, servers[0].port)))
                               if count > 1 else None)
            time.sleep(0.1)  # the last event lines reach the log file
            result["log_bytes"] = (sum(server.log_size() for server in servers) - logged) / max(1, result["requests"])
            result["statuses"] = count_statuses(servers[0].database)
            result["first"], result["split"] = first, split
        finally:
            for server in servers:
                server.stop()
        return result

    @staticmethod
    def round_text(result: dict) -> str:
        db = f" + PostgreSQL {result['db_us']:.0f} us" if result.get("db_us") is not None else ""
        split = f", connections per instance {result['split']}" if result.get("split") else ""
        return (f"{result['rate']:.0f} req/s ({result['requests']} requests, {result['errors']} errors, server CPU "
                f"{result['cpu_us']:.0f} us{db} and {result['switches']:.1f} context switches/request{split})")

    # 1. Trigger requests/s.

    def figure1(self) -> None:
        script = self.workdir / "flask_baseline.py"
        script.write_text(FLASK_BASELINE)
        flask = Child("flask-baseline", [sys.executable, str(script), str(HTTP_THREADS)], self.workdir)
        self.servers.append(flask)
        flask.start()
        ours_runs, base_runs = [], []
        try:
            for round_number in range(self.rounds):
                base_runs.append(self.load(flask, TRIGGER_PATH, 16, f"fig1-flask-{round_number}"))
                result = self.trigger_round(f"fig1-app-{round_number}", profile=True)
                ours_runs.append(result)
                note(f"fig 1 round {round_number + 1}: ours {self.round_text(result)}, jobs right after: "
                     f"{result['statuses']}, first token {result['first']}; flask {base_runs[-1]['rate']:.0f} req/s "
                     f"({base_runs[-1]['errors']} errors, CPU {base_runs[-1]['cpu_us']:.0f} us and "
                     f"{base_runs[-1]['switches']:.1f} context switches/request)")
        finally:
            flask.stop()
        ours, base = best_of(ours_runs), best_of(base_runs)
        self.ours["trigger_rate"] = ours["rate"]
        errors = f" ({ours['errors']} errors)" if ours["errors"] else ""
        row("1. trigger req/s, 16 conns, one log step", fmt(ours["rate"], "/s") + errors,
            fmt(base["rate"], "/s") + " flask", ratio_text(ours["rate"], base["rate"]), ">= 0.80",
            ours["rate"] >= 0.8 * base["rate"] and not ours["errors"])

    # 2. Jobs completed per second.

    def jobs_count(self) -> int:
        return 300 if self.quick else 2000

    def figure2(self) -> None:
        count = self.jobs_count()
        base_runs, ours_runs = [], []
        for round_number in range(self.rounds):
            # Baseline: sh -c true, `count` times on 4 threads.
            cpu_before, start = own_cpu_seconds(), time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                codes = list(pool.map(lambda _: subprocess.run(["sh", "-c", "true"]).returncode, range(count)))
            elapsed, cpu_after = time.perf_counter() - start, own_cpu_seconds()
            loop_us, sh_us = ((after - before) / count * 1e6 for before, after in zip(cpu_before, cpu_after))
            base_runs.append({"rate": count / elapsed, "loop_us": loop_us, "sh_us": sh_us,
                              "busy": (loop_us + sh_us) * count / 1e6 / elapsed})
            if codes.count(0) != count:
                raise RuntimeError("sh -c true failed")
            ours_runs.append(self.jobs_round(f"fig2-app-{round_number}", count, profile=round_number == 0))
        ours, base = best_of(ours_runs), best_of(base_runs)
        base_rate = base["rate"]
        self.ours["completion_rate"] = ours["rate"]
        note(f"fig 2: rounds ours {[round(r['rate']) for r in ours_runs]} jobs/s, baseline "
             f"{[round(r['rate']) for r in base_runs]} /s; best ours: {self.jobs_text(ours)}")
        # Where the time goes: CPU per job of every process involved, and how many cores were kept busy.
        note(f"fig 2 CPU per job: ours {ours['cpu_us']:.0f} us server + {ours['children_us']:.0f} us its `sh` "
             f"processes + {ours['client_us']:.0f} us client ({ours['tool']}), {ours['busy']:.2f} cores busy; "
             f"baseline {base['loop_us']:.0f} us Python loop + {base['sh_us']:.0f} us `sh`, {base['busy']:.2f} cores busy")
        ok = all(r["ok"] for r in ours_runs)
        row(f"2. jobs done/s, {count} x run=true, 4 workers", fmt(ours["rate"], "/s") + ("" if ok else " (not all Succeeded)"),
            fmt(base_rate, "/s") + " sh loop", ratio_text(ours["rate"], base_rate), ">= 0.60",
            ok and ours["rate"] >= 0.6 * base_rate)

    @staticmethod
    def jobs_text(result: dict) -> str:
        db = f" + PostgreSQL {result['db_us']:.0f} us" if result.get("db_us") is not None else ""
        return (f"{result['jobs']} jobs triggered in {result['triggered']:.2f} s ({result['tool']}), all final after "
                f"{result['elapsed']:.2f} s, server CPU {result['cpu_us']:.0f} us{db} and {result['switches']:.1f} "
                f"context switches per job (without its children), statuses {result['statuses']}"
                + (f", run by {result['owners']}" if result.get("owners") else ""))

    def jobs_round(self, name: str, count: int, db: str | None = None, instances: int = 1,
                   profile: bool = False) -> dict:
        """Figure 2's method on fresh servers (one, or `instances` sharing a port, each with 4 workers): trigger
        `count` jobs of `run = "true"` on 16 connections and time until every one is final."""
        servers = self.instances(name, TRUE_TEMPLATE, ("--workers", str(WORKERS)), db=db, count=instances)
        try:
            port, database = servers[0].port, servers[0].database
            connection = Connection(port)
            warm = []  # the first job of each server, on connections of their own
            for _ in servers:
                extra = Connection(port)
                warm.append(trigger(extra, "truejob"))
                extra.close()
            for token in warm:
                wait_final(connection, token, 30)
            if profile:
                servers[0].profile(self.profile_dir, name)
            pids = [server.pid for server in servers]
            cpu_before, switches_before = sum(map(cpu_seconds, pids)), sum(map(context_switches, pids))
            children_before = sum(cpu_seconds(pid, children=True) for pid in pids)
            client_before = sum(own_cpu_seconds())
            postgres = self.postgres_of(servers)
            db_before = tree_cpu_seconds(postgres) if postgres else 0.0
            start = time.perf_counter()
            if self.use_wrk:
                tool = "wrk"
                self.trigger_with_wrk(port, "/api/jobs/trigger?template=truejob", count, name)
            else:
                tool = "python"
                self.trigger_with_python(port, "truejob", count)
            triggered = time.perf_counter() - start
            # Until every job is final: wait (status?wait=) on the newest unfinished job, then look again.
            # Jobs start in trigger order, so one wait usually covers all; the database is only read.
            deadline = time.monotonic() + 120
            with StoreReader(database) as reader:
                while True:
                    newest = reader.value("SELECT max(id) FROM jobs WHERE status IN ('Pending', 'Executing')")
                    if newest is None:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"job {newest} still unfinished after 120 s")
                    wait_final(connection, str(newest), max(0.1, deadline - time.monotonic()))
            elapsed = time.perf_counter() - start
            cpu = sum(map(cpu_seconds, pids)) - cpu_before
            children = sum(cpu_seconds(pid, children=True) for pid in pids) - children_before
            client = sum(own_cpu_seconds()) - client_before
            switches = sum(map(context_switches, pids)) - switches_before
            db_cpu = tree_cpu_seconds(postgres) - db_before if postgres else None
            connection.close()
            statuses = count_statuses(database)
            ran_by = owners(database, servers) if instances > 1 else None
        finally:
            for server in servers:
                server.stop()
        jobs = sum(statuses.values()) - len(warm)
        per_job = max(1, jobs)
        return {"rate": jobs / elapsed, "jobs": jobs, "triggered": triggered, "elapsed": elapsed, "tool": tool,
                "cpu_us": cpu / per_job * 1e6, "switches": switches / per_job,
                "children_us": children / per_job * 1e6, "client_us": client / per_job * 1e6,
                "db_us": db_cpu / per_job * 1e6 if db_cpu is not None else None,
                "busy": (cpu + children + client + (db_cpu or 0)) / elapsed, "owners": ran_by,
                "statuses": statuses, "ok": statuses.get("Succeeded", 0) == jobs + len(warm) and jobs >= count}

    def trigger_with_wrk(self, port: int, path: str, count: int, label: str) -> None:
        """Send `count` requests (a few more: those in flight) on 16 connections with wrk, then stop it."""
        marker = self.workdir / f"{label}.done"
        script = self.workdir / f"{label}.lua"
        script.write_text(textwrap.dedent(f"""\
            local count = 0
            response = function(status, headers, body)
              count = count + 1
              if count == {count} then
                local f = io.open("{marker}", "w")
                f:write("done")
                f:close()
                wrk.thread:stop()
              end
            end
            """))
        process = subprocess.Popen(["wrk", "-t1", "-c16", "-d120s", "--timeout", "10s", "-s", str(script),
                                    f"http://127.0.0.1:{port}{path}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        CHILDREN.append(process)
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # wrk sleeps for its whole duration otherwise
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not marker.exists():
            raise RuntimeError(f"wrk stopped before {count} responses")

    def trigger_with_python(self, port: int, template: str, count: int) -> None:
        threads = 8

        def trigger_some(index: int) -> int:
            connection = Connection(port)
            try:
                return sum(1 for _ in range(index, count, threads) if trigger(connection, template))
            finally:
                connection.close()

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            if sum(pool.map(trigger_some, range(threads))) != count:
                raise RuntimeError("not every trigger was answered")

    # 3. Trigger to final status, idle server.

    def latency_count(self) -> int:
        return 50 if self.quick else 200

    @staticmethod
    def trigger_to_final(servers: list[App], runs: int, warm: int = 10) -> list[list[float]]:
        """Figure 3's method: trigger a `run = "true"` job and wait for its final status, one at a time, on one
        connection per server; with several servers, one run on each in turn, so that they share the noise.
        Returns the milliseconds of each run after the warm-up ones, per server."""
        connections = [Connection(server.port) for server in servers]
        times: list[list[float]] = [[] for _ in servers]
        try:
            for index in range(warm + runs):
                for number, connection in enumerate(connections):
                    start = time.perf_counter()
                    token = trigger(connection, "truejob")
                    status = wait_final(connection, token, 10)
                    elapsed = (time.perf_counter() - start) * 1000
                    if status != "Succeeded":
                        raise RuntimeError(f"job {token} of {servers[number].name} ended {status}")
                    if index >= warm:
                        times[number].append(elapsed)
        finally:
            for connection in connections:
                connection.close()
        return times

    def figure3(self) -> None:
        runs = self.latency_count()
        base = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(["sh", "-c", "true"], check=True)
            base.append((time.perf_counter() - start) * 1000)
        server = self.app("fig3-app", TRUE_TEMPLATE, "--workers", str(WORKERS))
        try:
            server.profile(self.profile_dir, "fig3")
            [ours] = self.trigger_to_final([server], runs)
        finally:
            server.stop()
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            o, b = percentile(ours, fraction), percentile(base, fraction)
            target = "overhead < 15 ms" if name == "p50" else "-"
            met = (o - b) < 15 if name == "p50" else None
            row(f"3. trigger->final {name}, idle, run=true ({runs} runs)", f"{o:.1f} ms (+{o - b:.1f})",
                f"{b:.1f} ms sh -c true", ratio_text(o, b), target, met)
        note(f"fig 3: ours mean {statistics.mean(ours):.1f} ms max {max(ours):.1f} ms; "
             f"baseline mean {statistics.mean(base):.1f} ms max {max(base):.1f} ms")

    # 4, 5 and 10. Log ingestion, then serving that log, then the job's page.

    def figures4_5_10(self, show4: bool, show5: bool, show10: bool) -> None:
        lines = self.log_lines
        command = f"seq {lines}"
        base_times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(["sh", "-c", f"{command} > /dev/null"], check=True)
            base_times.append(time.perf_counter() - start)
        base_rate = lines / min(base_times)
        templates = f'''
        [lines]
        description = "Prints many lines"
        max_log_bytes = 100000000
        timeout = 600
        [[lines.steps]]
        run = "{command}"
        ''' + textwrap.dedent(LOG_TEMPLATE)
        server = self.app("fig4-app", templates, "--workers", str(WORKERS))
        try:
            connection = Connection(server.port, timeout=300)
            server.profile(self.profile_dir, "fig4")
            start = time.perf_counter()
            token = trigger(connection, "lines")
            status = wait_final(connection, token, 240)
            elapsed = time.perf_counter() - start
            if status not in FINAL:
                raise RuntimeError(f"the {lines}-line job is still {status} after 240 s")
            probe = lines - 10
            code, body, headers = connection.get("/api/jobs/logs", {"token": token, "offset": probe})
            offset = int(headers.get("x-log-offset", "0"))
            stored = offset if body else None  # an empty body: fewer than `probe` entries were stored
            tail_ok = body.splitlines()[-1:] == [f"INFO: {lines}"]
            note(f"fig 4: job {token} ended {status} after {elapsed:.2f} s; X-Log-Offset {offset}, "
                 f"last entry {body.splitlines()[-1:]}; baseline {command} > /dev/null in {min(base_times) * 1000:.1f} ms")
            if show4:
                rate = (stored or 0) / elapsed
                ok = status == "Succeeded" and stored == lines and tail_ok
                row(f"4. log lines stored/s, {command}", fmt(rate, "/s") + ("" if ok else f" (stored {stored})"),
                    fmt(base_rate, "/s") + " >/dev/null", f"{rate / base_rate:.3f}", ">= 100,000/s",
                    ok and rate >= 100_000)
            if show5:
                self.figure5(server, token, lines)
            if show10:
                self.figure10(server, connection, token, lines)
            connection.close()
        finally:
            server.stop()

    def figure5(self, server: App, token: str, lines: int) -> None:
        count = size = 0
        last = b""
        start = time.perf_counter()
        with PeakMemory(server.pid) as measured:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            connection.request("GET", f"/api/jobs/logs?token={token}")
            response = connection.getresponse()
            header_offset = response.getheader("X-Log-Offset")
            while chunk := response.read(65536):
                count += chunk.count(b"\n")
                size += len(chunk)
                last = (last + chunk)[-64:]
            connection.close()
            elapsed = time.perf_counter() - start
        growth = measured.growth / 1e6
        before = measured.before["VmRSS"]
        last_line = last.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()
        ok = response.status == 200 and count == lines and last_line == f"INFO: {lines}"
        note(f"fig 5: {count} lines ({size / 1e6:.1f} MB) in {elapsed:.2f} s ({count / elapsed:,.0f} lines/s), "
             f"HTTP {response.status}, X-Log-Offset {header_offset}, last line {last_line!r}; {measured.text()}")
        row(f"5. RSS growth serving the {lines:,}-line log", f"{growth:.1f} MB" + ("" if ok else f" ({count} lines!)"),
            f"{before / 1e6:.1f} MB before", f"{measured.peak / before:.2f}", "< 50 MB growth",
            ok and growth < 50)

    def figure10(self, server: App, connection: Connection, token: str, lines: int) -> None:
        """The page of the job with the long log: its first answer with the server's RSS around it (after a
        page of a small job, so that the HTML templates are compiled already), then p50 of more, each beside
        /api/jobs/status of the same job."""
        small = trigger(connection, "logjob")
        wait_final(connection, small, 30)
        connection.timed(f"/jobs/{small}")
        page = f"/jobs/{token}"
        with PeakMemory(server.pid) as measured:
            first = connection.timed(page)
        size = connection.size
        code, body, _ = connection.get(page)
        shown = body.count('<li class="entry')
        ok = code == 200 and f'<span class="message">{lines}</span>' in body and shown <= 1000
        pages, statuses = [], []
        for _ in range(10 if self.quick else 30):
            pages.append(connection.timed(page))
            statuses.append(connection.timed(f"/api/jobs/status?token={token}"))
        p50, status_p50 = percentile(pages, 0.5), percentile(statuses, 0.5)
        raw = log_bytes(lines)
        growth = measured.growth
        note(f"fig 10: job page of {lines:,} entries: first {first:.1f} ms, then p50 {p50:.1f} ms max "
             f"{max(pages):.1f} ms over {len(pages)}, status of the same job p50 {status_p50:.2f} ms; {size:,} bytes "
             f"showing {shown} entries (HTTP {code}); {measured.text()}")
        label = f"10. job page, {lines:,}-entry log"
        check = "" if ok else " (wrong page!)"
        row(f"{label}: p50", f"{p50:.1f} ms (first {first:.0f})" + check, f"{status_p50:.2f} ms status",
            ratio_text(p50, status_p50), "< 100 ms", ok and p50 < 100)
        row(f"{label}: size", f"{size:,} B" + check, f"{raw:,} B raw log", f"{size / raw:.4f}", "< 5 MB",
            ok and size < 5e6)
        row(f"{label}: RSS growth", f"{growth / 1e6:.1f} MB", f"{measured.before['VmRSS'] / 1e6:.1f} MB before",
            f"{measured.peak / measured.before['VmRSS']:.2f}", "< 5 MB", growth < 5e6)

    # 6. Status lookups/s, 1,000 vs 1,000,000 jobs.

    def figure6(self) -> None:
        small, large = 1000, self.large
        servers, results = {}, {small: [], large: []}
        try:
            for size in (small, large):
                servers[size] = self.app(f"fig6-app-{size}", LOG_TEMPLATE, "--workers", str(WORKERS),
                                         db=self.database(size))
                connection = Connection(servers[size].port)
                for token in (1, size // 2, size):
                    code, body, _ = connection.get("/api/jobs/status", {"token": token})
                    if (code, body) != (200, "Succeeded"):
                        raise RuntimeError(f"status of job {token} of {size}: HTTP {code} {body!r}")
                connection.close()
            for round_number in range(self.rounds):
                for size in (small, large):
                    if round_number == 0:
                        servers[size].profile(self.profile_dir, f"fig6-{size}")
                    results[size].append(self.load(servers[size], ("random-token", size), 16,
                                                   f"fig6-{size}-{round_number}"))
        finally:
            for server in servers.values():
                server.stop()
        a, b = best_of(results[small]), best_of(results[large])
        note(f"fig 6: rounds {[round(r['rate']) for r in results[small]]} (1k) vs "
             f"{[round(r['rate']) for r in results[large]]} ({large:,}); errors {a['errors']} / {b['errors']}; "
             f"server CPU {a['cpu_us']:.0f} / {b['cpu_us']:.0f} us/request")
        ok = not a["errors"] and not b["errors"]
        row(f"6. status req/s, {large:,} vs {small:,} jobs in db", fmt(b["rate"], "/s"),
            fmt(a["rate"], "/s") + f" ({small:,})", ratio_text(b["rate"], a["rate"]), ">= 0.80",
            ok and b["rate"] >= 0.8 * a["rate"])

    # 7. webhook, the peer.

    def figure7(self) -> None:
        if not shutil.which("webhook"):
            note("fig 7: webhook is not installed (Debian package webhook): no peer figures")
            return
        hooks = [
            {"id": "true", "execute-command": "/bin/sh", "response-message": "ok",
             "pass-arguments-to-command": [{"source": "string", "name": "-c"}, {"source": "string", "name": "true"}]},
            {"id": "true-sync", "execute-command": "/bin/sh", "include-command-output-in-response": True,
             "pass-arguments-to-command": [{"source": "string", "name": "-c"}, {"source": "string", "name": "true"}]},
        ]
        hooks_path = self.workdir / "hooks.json"
        hooks_path.write_text(json.dumps(hooks, indent=2))
        results = {}
        # The synchronous run first, each on a fresh webhook: the async run leaves a backlog of commands
        # that are still being started after it (webhook answers before it runs them).
        for label, hook, connections in (("sync", "true-sync", WORKERS), ("async", "true", 16)):
            port = free_port()
            peer = Child(f"webhook-{label}", ["webhook", "-hooks", str(hooks_path), "-ip", "127.0.0.1",
                                              "-port", str(port)], self.workdir, port=port)
            self.servers.append(peer)
            peer.start(announce=False)
            try:
                connection = Connection(port)
                code, body, _ = connection.get(f"/hooks/{hook}")
                connection.close()
                if code != 200:
                    raise RuntimeError(f"webhook /hooks/{hook}: HTTP {code} {body[:200]}")
                results[label] = self.load(peer, f"/hooks/{hook}", connections, f"fig7-webhook-{label}")
            finally:
                peer.stop()
        asynchronous, synchronous = results["async"], results["sync"]
        note(f"fig 7: webhook async {asynchronous['rate']:.0f} req/s ({asynchronous['errors']} errors), "
             f"sync {synchronous['rate']:.0f} req/s on {WORKERS} conns ({synchronous['errors']} errors)")
        ours = self.ours.get("trigger_rate")
        row("7. peer: webhook async trigger req/s, 16 conns", fmt(ours, "/s") if ours else "(run fig 1)",
            fmt(asynchronous["rate"], "/s") + " webhook", ratio_text(ours, asynchronous["rate"]) if ours else "-",
            "-", None)
        ours = self.ours.get("completion_rate")
        row(f"7. peer: webhook sync completions/s, {WORKERS} conns", fmt(ours, "/s") if ours else "(run fig 2)",
            fmt(synchronous["rate"], "/s") + " webhook", ratio_text(ours, synchronous["rate"]) if ours else "-",
            "-", None)

    # 8. Triggers while 1,000 followers wait.

    def figure8(self) -> None:
        followers = 1000
        # p99 from 1,000 samples (its 10 slowest), and the baseline measured both before the followers come
        # and after they are gone, so that the VM's drift over the figure weighs on both sides alike
        samples = 100 if self.quick else 1000
        server = self.app("fig8-app", LOG_TEMPLATE + SLEEP_TEMPLATE)  # app.py's defaults
        sockets: list[socket.socket] = []
        connection = Connection(server.port)
        sleeper = None
        try:
            sleeper = trigger(connection, "sleeper")
            deadline = time.monotonic() + 10
            while connection.get("/api/jobs/status", {"token": sleeper})[1] != "Executing":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sleeping job {sleeper} did not start within 10 s")
                time.sleep(0.01)
            for _ in range(20):  # warm
                trigger(connection, "logjob")
            server.profile(self.profile_dir, "fig8")
            alone = self.trigger_latencies(connection, samples)
            before = memory(server.pid)
            raise_open_files(followers + 256)
            request = (f"GET /api/jobs/status?token={sleeper}&wait=30 HTTP/1.1\r\n"
                       f"Host: 127.0.0.1:{server.port}\r\n\r\n").encode()
            start = time.perf_counter()
            for _ in range(followers):
                follower = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sockets.append(follower)
                follower.sendall(request)
            opened = time.perf_counter() - start
            deadline = time.monotonic() + 20
            while (held := metric(connection, "jobserver_long_polls_waiting")) is None or held < followers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server holds {held} of {followers} followers after 20 s")
                time.sleep(0.05)
            holding = time.perf_counter() - start
            with_followers = memory(server.pid)
            during = self.trigger_latencies(connection, samples)
            still = metric(connection, "jobserver_long_polls_waiting")
            poller = select.poll()
            for follower in sockets:
                poller.register(follower, select.POLLIN)
            answered = len(poller.poll(0))  # followers answered (or closed) before their 30 s
            measured = time.perf_counter() - start
            connection.get("/api/jobs/cancel", {"token": sleeper})  # the followers' answer: the job's end
            deadline = time.monotonic() + 20
            while (held := metric(connection, "jobserver_long_polls_waiting")) is None or held > 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server still holds {held} followers 20 s after their job ended")
                time.sleep(0.05)
            for follower in sockets:
                follower.close()
            sockets.clear()
            alone += self.trigger_latencies(connection, samples)
        finally:
            for follower in sockets:
                follower.close()
            if sleeper is not None:
                try:
                    connection.get("/api/jobs/cancel", {"token": sleeper})
                except OSError:
                    pass
            connection.close()
            server.stop()
        growth = with_followers["VmRSS"] - before["VmRSS"]
        note(f"fig 8: {followers} followers connected in {opened:.2f} s, all held after {holding:.2f} s, "
             f"{still:.0f} still held and {answered} answered early at the end ({measured:.1f} s after the first); "
             f"trigger ms p50/p99/max alone {self.spread(alone)}, with followers {self.spread(during)}; "
             f"RSS {before['VmRSS'] / 1e6:.1f} -> {with_followers['VmRSS'] / 1e6:.1f} MB, threads "
             f"{before['Threads']} -> {with_followers['Threads']}")
        ok = still == followers and not answered
        held_text = "" if ok else f" ({still:.0f} held, {answered} answered!)"
        for name, fraction, target in (("p50", 0.5, None), ("p99", 0.99, 2.0)):
            o, b = percentile(during, fraction), percentile(alone, fraction)
            row(f"8. trigger {name}, {followers:,} followers vs none", f"{o:.2f} ms" + held_text,
                f"{b:.2f} ms none", ratio_text(o, b), f"<= {target:.2f}" if target else "-",
                ok and o <= target * b if target else None)
        row(f"8. server RSS with {followers:,} followers", f"{with_followers['VmRSS'] / 1e6:.1f} MB "
            f"(+{growth / followers / 1024:.1f} KB each)", f"{before['VmRSS'] / 1e6:.1f} MB none",
            ratio_text(with_followers["VmRSS"], before["VmRSS"]), "-", None)

    @staticmethod
    def spread(times: list[float]) -> str:
        return f"{percentile(times, 0.5):.2f}/{percentile(times, 0.99):.2f}/{max(times):.2f}"

    @staticmethod
    def trigger_latencies(connection: Connection, samples: int) -> list[float]:
        """Milliseconds of `samples` sequential triggers of the one-log-step template on one connection."""
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            trigger(connection, "logjob")
            times.append((time.perf_counter() - start) * 1000)
        return times

    # 9. The web pages on a large database.

    def figure9(self) -> None:
        size = self.large
        samples = 100 if self.quick else 300
        server = self.app("fig9-app", LOG_TEMPLATE, db=self.database(size))
        rng = random.Random(9)
        kinds = ("/", "/jobs/<token>", "/api/jobs/status")
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        try:
            connection = Connection(server.port)
            code, body, _ = connection.get("/")
            listed = f'href="/jobs/{size}"' in body
            list_size = connection.size
            token = rng.randint(1, size)
            code_page, page, _ = connection.get(f"/jobs/{token}")
            page_ok = code_page == 200 and "hello" in page
            if code != 200 or not listed or not page_ok:
                raise RuntimeError(f"/: HTTP {code}, newest job listed: {listed}; /jobs/{token}: HTTP {code_page}, "
                                   f"its log entry shown: {page_ok}")
            page_size = connection.size
            server.profile(self.profile_dir, "fig9")
            for index in range(20 + samples):  # the first 20 warm; the kinds take turns, so share the noise
                for kind in kinds:
                    if kind == "/":
                        path = "/"
                    elif kind == "/jobs/<token>":
                        path = f"/jobs/{rng.randint(1, size)}"
                    else:
                        path = f"/api/jobs/status?token={rng.randint(1, size)}"
                    elapsed = connection.timed(path)
                    if index >= 20:
                        times[kind].append(elapsed)
            connection.close()
        finally:
            server.stop()
        p50 = {kind: percentile(values, 0.5) for kind, values in times.items()}
        p99 = {kind: percentile(values, 0.99) for kind, values in times.items()}
        note(f"fig 9: {samples} of each on {size:,} jobs, ms p50/p99: "
             + ", ".join(f"{kind} {p50[kind]:.2f}/{p99[kind]:.2f}" for kind in kinds)
             + f"; / is {list_size:,} bytes, a job page {page_size:,} bytes")
        status = p50["/api/jobs/status"]
        for kind in kinds[:2]:
            row(f"9. {kind} p50, {size:,} jobs in db", f"{p50[kind]:.2f} ms", f"{status:.2f} ms status",
                ratio_text(p50[kind], status), "<= 2.00", p50[kind] <= 2 * status)

    # 11. PostgreSQL against SQLite, and two instances against one.

    def figure11(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        try:
            from postgres_server import PostgresServer, missing_postgres_message
        except ImportError as error:
            note(f"fig 11: skipped: {error} (python -m pip install -r requirements.txt)")
            return
        finally:
            sys.path.remove(str(ROOT / "tests"))
        missing = missing_postgres_message()
        if missing:
            note(f"fig 11: skipped: {missing}")
            return
        postgres = PostgresServer(settings=POSTGRES_SETTINGS)
        names = iter(range(1, 1000))
        try:
            started = time.perf_counter()
            postgres.start()
            self.postgres_pid = int((postgres.data_dir / "postmaster.pid").read_text().split()[0])
            version = postgres.execute("SHOW server_version")[0][0]
            note(f"fig 11: PostgreSQL {version} started in {time.perf_counter() - started:.1f} s with "
                 + ", ".join(f"{k}={v}" for k, v in POSTGRES_SETTINGS.items())
                 + ": like SQLite's WAL with synchronous=NORMAL as app.py runs it, a commit survives a crash of app.py"
                   " (and of PostgreSQL's backends), not a power cut or an OS crash (then the last commits, up to"
                   " 3 x wal_writer_delay, may be lost); a fresh database for each server or pair")

            def fresh() -> str:
                return postgres.create_database(f"bench{next(names)}")

            configs = (("sqlite", 1), ("pg1", 1), ("pg2", 2))
            triggers: dict[str, list[dict]] = {name: [] for name, _ in configs}
            jobs: dict[str, list[dict]] = {name: [] for name, _ in configs}
            for round_number in range(self.rounds):
                # The order turns each round, so that no configuration always comes first after a pause.
                order = configs[round_number % 3:] + configs[:round_number % 3]
                for name, count in order:
                    db = None if name == "sqlite" else fresh()
                    result = self.trigger_round(f"fig11-{name}-triggers-{round_number}", db=db, count=count)
                    triggers[name].append(result)
                    note(f"fig 11 round {round_number + 1}: {name} triggers {self.round_text(result)}")
                for name, count in order:
                    db = None if name == "sqlite" else fresh()
                    result = self.jobs_round(f"fig11-{name}-jobs-{round_number}", self.jobs_count(), db=db,
                                             instances=count)
                    jobs[name].append(result)
                    note(f"fig 11 round {round_number + 1}: {name} jobs {result['rate']:.0f}/s: "
                         f"{self.jobs_text(result)}")
            runs = self.latency_count()
            servers = [self.app("fig11-sqlite-latency", TRUE_TEMPLATE, "--workers", str(WORKERS)),
                       self.app("fig11-pg1-latency", TRUE_TEMPLATE, "--workers", str(WORKERS), db=fresh())]
            try:
                latency_sqlite, latency_pg = self.trigger_to_final(servers, runs)
            finally:
                for server in servers:
                    server.stop()
        finally:
            self.postgres_pid = None
            postgres.stop()
        best_triggers = {name: best_of(results) for name, results in triggers.items()}
        best_jobs = {name: best_of(results) for name, results in jobs.items()}
        note("fig 11 rounds: triggers/s " + "; ".join(f"{name} {[round(r['rate']) for r in triggers[name]]}"
                                                      for name, _ in configs)
             + "; jobs/s " + "; ".join(f"{name} {[round(r['rate']) for r in jobs[name]]}" for name, _ in configs)
             + f"; trigger->final ms p50/p99 sqlite {percentile(latency_sqlite, 0.5):.1f}/"
               f"{percentile(latency_sqlite, 0.99):.1f}, pg1 {percentile(latency_pg, 0.5):.1f}/"
               f"{percentile(latency_pg, 0.99):.1f}")
        pg, lite, pair = best_triggers["pg1"], best_triggers["sqlite"], best_triggers["pg2"]
        errors = {name: r["errors"] for name, r in best_triggers.items() if r["errors"]}
        flag = f" ({errors} errors)" if errors else ""
        row("11. PostgreSQL vs SQLite: trigger req/s", fmt(pg["rate"], "/s") + flag,
            fmt(lite["rate"], "/s") + " SQLite", ratio_text(pg["rate"], lite["rate"]), ">= 0.80",
            not errors and pg["rate"] >= 0.8 * lite["rate"])
        jobs_ok = all(r["ok"] for results in jobs.values() for r in results)
        flag = "" if jobs_ok else " (not all Succeeded)"
        pg, lite, pair_jobs = best_jobs["pg1"], best_jobs["sqlite"], best_jobs["pg2"]
        row(f"11. PostgreSQL vs SQLite: jobs done/s, {self.jobs_count()} x run=true", fmt(pg["rate"], "/s") + flag,
            fmt(lite["rate"], "/s") + " SQLite", ratio_text(pg["rate"], lite["rate"]), ">= 0.80",
            jobs_ok and pg["rate"] >= 0.8 * lite["rate"])
        o, b = percentile(latency_pg, 0.5), percentile(latency_sqlite, 0.5)
        row(f"11. PostgreSQL vs SQLite: trigger->final p50 ({runs} runs)", f"{o:.1f} ms", f"{b:.1f} ms SQLite",
            ratio_text(b, o) + " (speed)", ">= 0.80", b >= 0.8 * o)
        one = best_triggers["pg1"]
        row("11. 2 instances vs 1, one port, PostgreSQL: trigger req/s", fmt(pair["rate"], "/s"),
            fmt(one["rate"], "/s") + " one", ratio_text(pair["rate"], one["rate"]), ">= 1.30",
            not errors and pair["rate"] >= 1.3 * one["rate"])
        row("11. 2 instances vs 1, one port, PostgreSQL: jobs done/s", fmt(pair_jobs["rate"], "/s") + flag,
            fmt(best_jobs["pg1"]["rate"], "/s") + " one", ratio_text(pair_jobs["rate"], best_jobs["pg1"]["rate"]),
            ">= 1.30", jobs_ok and pair_jobs["rate"] >= 1.3 * best_jobs["pg1"]["rate"])

    # 12. Event lines: figure 1 with and without them.

    def figure12(self) -> None:
        runs: dict[str, list[dict]] = {"info": [], "warning": []}
        rounds = 1 if self.quick else 5  # a 5% target: more rounds than the others, for a quiet moment in each
        for round_number in range(rounds):
            order = ("info", "warning") if round_number % 2 == 0 else ("warning", "info")
            for level in order:
                result = self.trigger_round(f"fig12-{level}-{round_number}", "--log-level", level)
                runs[level].append(result)
                note(f"fig 12 round {round_number + 1}: --log-level {level} {self.round_text(result)}, "
                     f"{result['log_bytes']:.0f} bytes of event lines per request")
        info, warning = best_of(runs["info"]), best_of(runs["warning"])
        paired = [a["rate"] / b["rate"] for a, b in zip(runs["info"], runs["warning"])]
        note(f"fig 12: rounds info {[round(r['rate']) for r in runs['info']]}, warning "
             f"{[round(r['rate']) for r in runs['warning']]} req/s; median of the rounds' ratios "
             f"{statistics.median(paired):.2f}; least server CPU per request info "
             f"{min(r['cpu_us'] for r in runs['info']):.0f} us, warning "
             f"{min(r['cpu_us'] for r in runs['warning']):.0f} us")
        errors = info["errors"] + warning["errors"]
        flag = f" ({errors} errors)" if errors else ""
        row("12. trigger req/s with event lines vs none", fmt(info["rate"], "/s") + flag,
            fmt(warning["rate"], "/s") + " warning", ratio_text(info["rate"], warning["rate"]), ">= 0.95",
            not errors and info["rate"] >= 0.95 * warning["rate"])


#
# Main.
#


def machine() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tools = []
    for tool, flag in (("wrk", "--version"), ("webhook", "-version")):
        path = shutil.which(tool)
        if path:
            out = subprocess.run([tool, flag], capture_output=True, text=True)
            tools.append((out.stdout + out.stderr).strip().splitlines()[0][:40])
        else:
            tools.append(f"{tool}: not installed")
    return [
        f"machine: {cpus} CPUs (nproc), {model}, {platform.system()} {platform.release()}",
        f"python: {platform.python_implementation()} {platform.python_version()}; tools: {'; '.join(tools)}",
    ]


def print_table() -> None:
    header = ("figure", "ours", "baseline", "ratio", "target", "met?")
    ROWS.sort(key=lambda r: int(re.match(r"\d+", r[0]).group()))  # in figure order (stable within a figure)
    widths = [max(len(r[i]) for r in [header, *ROWS]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " The figures:\n\n"
                                     + __doc__.split("The figures:\n\n", 1)[1].split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="A full run takes about 5.5 minutes on 2 cores (figure 11 half of it),"
                                            " --quick about 1.")
    parser.add_argument("--quick", action="store_true", help="smaller counts and shorter loads, for a smoke run")
    parser.add_argument("--only", help=f"comma-separated figure numbers ({FIGURES[0]}-{FIGURES[-1]}) to run")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python client even where wrk is installed")
    parser.add_argument("--py-spy", metavar="DIR", help="record each app.py server with py-spy (raw stacks) into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (printed at the end)")
    options = parser.parse_args(argv)
    wanted = set(FIGURES)
    if options.only:
        try:
            wanted = {int(part) for part in options.only.split(",") if part.strip()}
        except ValueError:
            parser.error("--only takes comma-separated figure numbers")
        if not wanted <= set(FIGURES):
            parser.error(f"--only takes figure numbers from {FIGURES[0]} to {FIGURES[-1]}")

    workdir = Path(tempfile.mkdtemp(prefix="otter-bench-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    busy_before, own_before = machine_busy_seconds(), sum(own_cpu_seconds())
    bench = Bench(options, workdir)
    failures = 0
    try:
        steps = [
            ({1}, "1", bench.figure1), ({2}, "2", bench.figure2), ({3}, "3", bench.figure3),
            ({4, 5, 10}, "4/5/10", lambda: bench.figures4_5_10(4 in wanted, 5 in wanted, 10 in wanted)),
            ({6}, "6", bench.figure6), ({7}, "7", bench.figure7), ({8}, "8", bench.figure8),
            ({9}, "9", bench.figure9), ({11}, "11", bench.figure11), ({12}, "12", bench.figure12),
        ]
        for numbers, label, step in steps:
            if not numbers & wanted:
                continue
            print(f"running figure {label} ...", file=sys.stderr, flush=True)
            step_started = time.perf_counter()
            try:
                step()
            except Exception as error:  # one broken figure must not hide the others
                failures += 1
                row(f"{label}. (failed)", f"error: {error}"[:100], "-", "-", "-", False)
                for server in bench.servers:
                    tail = server.log_tail(600)
                    if tail.strip() and server.process is not None and server.process.returncode not in (0, None, -15):
                        note(f"{server.name} log tail: {tail!r}")
            print(f"  figure {label}: {time.perf_counter() - step_started:.0f} s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        for server in bench.servers:
            server.stop(timeout=10)
        for process in CHILDREN:
            stop_process(process, timeout=10)
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started
    # Every process this run started has been waited for, so its CPU time (and its children's) is in ours.
    others = (machine_busy_seconds() - busy_before) - (sum(own_cpu_seconds()) - own_before)
    print()
    for line in machine():
        print(line)
    print(f"load: wrk={'yes' if bench.use_wrk else 'no (python client)'}; other processes kept "
          f"{max(0.0, others) / elapsed:.2f} cores busy on average (/proc/stat less this run's own CPU); load average "
          f"before {load_before[0]:.2f}, after {load_after[0]:.2f} (counting this run's own servers, each up to 1,016 "
          f"threads); total {elapsed:.0f} s; "
          f"command: python tests/benchmark.py{' --quick' if options.quick else ''}"
          f"{' --only ' + options.only if options.only else ''}")
    print()
    print_table()
    if NOTES:
        print()
        for text in NOTES:
            print(f"- {text}")
    if options.keep:
        print(f"\nkept {workdir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

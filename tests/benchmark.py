"""Benchmark of the job orchestration server: every figure is a ratio against a baseline run side by side.

    python tests/benchmark.py                 # the full run (about 1.5 minutes on 2 cores)
    python tests/benchmark.py --quick         # smaller counts, a smoke run (about 15 s)
    python tests/benchmark.py --only 1,3      # some figures only (4 and 5 share one job)
    python tests/benchmark.py --py-spy DIR    # also record each app.py server with py-spy (raw stacks)

It starts real `python app.py` processes on 127.0.0.1 (port 0), each with its own temporary templates and
database, measures them and a baseline in the same run on the same machine, and prints one table:
figure | ours | baseline | ratio | target | met?. HTTP load comes from `wrk` (Debian package wrk) when it is
installed (install: apt-get install wrk), else from a Python keep-alive client (threads + http.client;
also --no-wrk), which costs more client CPU on the same cores, so its figures are lower bounds. Where `webhook` (Debian package webhook) is installed,
its async trigger rate and synchronous completion rate are printed beside ours.

Throughput figures alternate ours and the baseline for several rounds and keep the best of each, because
other load on a shared machine only ever slows a round down. The notes under the table give counts, errors,
the server's CPU time and context switches per request, and for figure 2 the CPU time per job of every process
involved (server, its `sh` processes, the load client) beside the baseline's, with the cores they kept busy. Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import os
import platform
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
SCHEMA = ROOT / "schema.sql"
HTTP_THREADS = 16  # app.py's --http-threads default; the Flask baseline gets the same
WORKERS = 4
FINAL = ("Succeeded", "Warning", "Error")

CHILDREN: list[subprocess.Popen] = []  # every process started here, stopped in main's finally
NOTES: list[str] = []
ROWS: list[tuple[str, str, str, str, str, str]] = []


def note(text: str) -> None:
    NOTES.append(text)
    print(f"  .. {text}", file=sys.stderr, flush=True)


def row(figure: str, ours: str, baseline: str, ratio: str, target: str, met) -> None:
    met_text = "-" if met is None else ("yes" if met else "NO")
    ROWS.append((figure, ours, baseline, ratio, target, met_text))


#
# Child processes.
#


class Child:
    """A server process on loopback: app.py, the Flask baseline or webhook."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int | None = None):
        self.name, self.argv, self.workdir = name, argv, workdir
        self.port = port
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.profiler: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 30.0, announce: bool = True) -> "Child":
        """Start it; with announce, the first stdout line is "Serving on http://127.0.0.1:PORT ..."."""
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
    """A real `python app.py` with its own templates file and database in a directory of its own."""

    def __init__(self, workdir: Path, name: str, templates: str, *args: str, db: Path | None = None):
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        self.templates = directory / "templates.toml"
        self.templates.write_text(textwrap.dedent(templates))
        self.db = db or directory / "jobs.db"
        argv = [sys.executable, str(APP), "--host", "127.0.0.1", "--port", "0", "--templates", str(self.templates),
                "--db", str(self.db), "--grace", "5", *args]
        super().__init__(name, argv, directory)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads), from /proc; or, with children, that of its
    children it has reaped (a server's job processes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> tuple[float, float]:
    """CPU time of this benchmark process, and of the children it has reaped (wrk, `sh` in a baseline)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#
# HTTP clients.
#


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, port: int, timeout: float = 70.0):
        self.port, self.timeout = port, timeout
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(self, path: str, params: dict | None = None) -> tuple[int, str, dict]:
        url = path + ("?" + urllib.parse.urlencode(params) if params else "")
        for attempt in (1, 2):
            try:
                self.connection.request("GET", url)
                response = self.connection.getresponse()
                body = response.read().decode("utf-8", "replace")
                if response.will_close:
                    self.connection.close()
                return response.status, body, {k.lower(): v for k, v in response.getheaders()}
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.connection.close()


def http_load(port: int, paths, connections: int, duration: float, use_wrk: bool, workdir: Path,
              label: str) -> dict:
    """Keep `connections` keep-alive connections busy for `duration` seconds.

    paths is a fixed path or ("random-token", n) for /api/jobs/status?token=<random 1..n>.
    Returns {"rate": requests/s, "requests": n, "errors": non-2xx + socket errors, "tool": "wrk"|"python"}."""
    if use_wrk:
        return wrk_load(port, paths, connections, duration, workdir, label)
    return python_load(port, paths, connections, duration)


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
    import random

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


def count_statuses(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as connection:
        return dict(connection.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())


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


class Bench:
    def __init__(self, options, workdir: Path):
        self.options, self.workdir = options, workdir
        self.quick = options.quick
        self.use_wrk = bool(shutil.which("wrk")) and not options.no_wrk
        self.duration = 2.0 if self.quick else 4.0
        self.rounds = 1 if self.quick else 3
        self.profile_dir = Path(options.py_spy) if options.py_spy else None
        if self.profile_dir:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.ours: dict[str, float] = {}  # figures the webhook rows compare against
        self.servers: list[Child] = []

    def app(self, name: str, templates: str, *args: str, db: Path | None = None) -> App:
        server = App(self.workdir, name, templates, *args, db=db)
        self.servers.append(server)
        server.start()
        return server

    def load(self, server: Child, paths, connections: int, label: str, duration: float | None = None) -> dict:
        """HTTP load on a server; adds the server's CPU time ("cpu_us") and context switches ("switches") per
        request to the result."""
        before, switches_before = cpu_seconds(server.pid), context_switches(server.pid)
        result = http_load(server.port, paths, connections, duration or self.duration, self.use_wrk, self.workdir, label)
        result["cpu_us"] = (cpu_seconds(server.pid) - before) / max(1, result["requests"]) * 1e6
        result["switches"] = (context_switches(server.pid) - switches_before) / max(1, result["requests"])
        return result

    # 1. Trigger requests/s.

    def figure1(self) -> None:
        script = self.workdir / "flask_baseline.py"
        script.write_text(FLASK_BASELINE)
        flask = Child("flask-baseline", [sys.executable, str(script), str(HTTP_THREADS)], self.workdir)
        self.servers.append(flask)
        flask.start()
        path = "/api/jobs/trigger?template=logjob"
        ours_runs, base_runs = [], []
        try:
            for round_number in range(self.rounds):
                base_runs.append(self.load(flask, path, 16, f"fig1-flask-{round_number}"))
                # A fresh server each round, so that no backlog of the last round's jobs runs meanwhile.
                server = self.app(f"fig1-app-{round_number}", LOG_TEMPLATE, "--workers", str(WORKERS),
                                  "--http-threads", str(HTTP_THREADS), "--max-pending", "10000000")
                try:
                    first = trigger(Connection(server.port), "logjob")
                    server.profile(self.profile_dir, f"fig1-{round_number}")
                    result = self.load(server, path, 16, f"fig1-app-{round_number}")
                    statuses = count_statuses(server.db)
                    result["statuses"] = statuses
                    ours_runs.append(result)
                    note(f"fig 1 round {round_number + 1}: ours {result['rate']:.0f} req/s "
                         f"({result['requests']} requests, {result['errors']} errors, server CPU "
                         f"{result['cpu_us']:.0f} us and {result['switches']:.1f} context switches/request, jobs right "
                         f"after: {statuses}, first token {first}), flask {base_runs[-1]['rate']:.0f} req/s "
                         f"({base_runs[-1]['errors']} errors, CPU {base_runs[-1]['cpu_us']:.0f} us and "
                         f"{base_runs[-1]['switches']:.1f} context switches/request)")
                finally:
                    server.stop()
        finally:
            flask.stop()
        ours, base = best_of(ours_runs), best_of(base_runs)
        self.ours["trigger_rate"] = ours["rate"]
        errors = f" ({ours['errors']} errors)" if ours["errors"] else ""
        row("1. trigger req/s, 16 conns, one log step", fmt(ours["rate"], "/s") + errors,
            fmt(base["rate"], "/s") + " flask", ratio_text(ours["rate"], base["rate"]), ">= 0.80",
            ours["rate"] >= 0.8 * base["rate"] and not ours["errors"])

    # 2. Jobs completed per second.

    def figure2(self) -> None:
        count = 300 if self.quick else 2000
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
            ours_runs.append(self.figure2_ours(count, round_number))
        ours, base = max(ours_runs, key=lambda r: r["rate"]), max(base_runs, key=lambda r: r["rate"])
        base_rate = base["rate"]
        self.ours["completion_rate"] = ours["rate"]
        note(f"fig 2: rounds ours {[round(r['rate']) for r in ours_runs]} jobs/s, baseline "
             f"{[round(r['rate']) for r in base_runs]} /s; best ours: {ours['jobs']} jobs triggered in {ours['triggered']:.2f} s "
             f"({ours['tool']}), all final after {ours['elapsed']:.2f} s, server CPU {ours['cpu_us']:.0f} us and "
             f"{ours['switches']:.1f} context switches per job (without its children), statuses {ours['statuses']}")
        # Where the time goes: CPU per job of every process involved, and how many cores were kept busy.
        note(f"fig 2 CPU per job: ours {ours['cpu_us']:.0f} us server + {ours['children_us']:.0f} us its `sh` "
             f"processes + {ours['client_us']:.0f} us client ({ours['tool']}), {ours['busy']:.2f} cores busy; "
             f"baseline {base['loop_us']:.0f} us Python loop + {base['sh_us']:.0f} us `sh`, {base['busy']:.2f} cores busy")
        ok = all(r["ok"] for r in ours_runs)
        row(f"2. jobs done/s, {count} x run=true, 4 workers", fmt(ours["rate"], "/s") + ("" if ok else " (not all Succeeded)"),
            fmt(base_rate, "/s") + " sh loop", ratio_text(ours["rate"], base_rate), ">= 0.60",
            ok and ours["rate"] >= 0.6 * base_rate)

    def figure2_ours(self, count: int, round_number: int) -> dict:
        server = self.app(f"fig2-app-{round_number}", TRUE_TEMPLATE, "--workers", str(WORKERS),
                          "--max-pending", str(count + 1000))
        try:
            connection = Connection(server.port)
            trigger(connection, "truejob")  # warm: the first job of a server
            wait_final(connection, "1", 30)
            if round_number == 0:
                server.profile(self.profile_dir, "fig2")
            cpu_before, switches_before = cpu_seconds(server.pid), context_switches(server.pid)
            children_before, client_before = cpu_seconds(server.pid, children=True), sum(own_cpu_seconds())
            start = time.perf_counter()
            if self.use_wrk:
                tool = "wrk"
                self.trigger_with_wrk(server.port, "/api/jobs/trigger?template=truejob", count, f"fig2-{round_number}")
            else:
                tool = "python"
                self.trigger_with_python(server.port, "truejob", count)
            triggered = time.perf_counter() - start
            # Until every job is final: wait (status?wait=) on the newest unfinished job, then look again.
            # Jobs start in trigger order, so one wait usually covers all; the database is only read.
            deadline = time.monotonic() + 120
            with sqlite3.connect(f"file:{server.db}?mode=ro", uri=True, timeout=10) as db:
                while True:
                    newest = db.execute("SELECT max(id) FROM jobs WHERE status IN ('Pending', 'Executing')").fetchone()[0]
                    if newest is None:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"job {newest} still unfinished after 120 s")
                    wait_final(connection, str(newest), max(0.1, deadline - time.monotonic()))
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(server.pid) - cpu_before
            children = cpu_seconds(server.pid, children=True) - children_before
            client = sum(own_cpu_seconds()) - client_before
            switches = context_switches(server.pid) - switches_before
            connection.close()
            statuses = count_statuses(server.db)
        finally:
            server.stop()
        jobs = sum(statuses.values()) - 1  # without the warm-up job
        return {"rate": jobs / elapsed, "jobs": jobs, "triggered": triggered, "elapsed": elapsed, "tool": tool,
                "cpu_us": cpu / max(1, jobs) * 1e6, "switches": switches / max(1, jobs),
                "children_us": children / max(1, jobs) * 1e6, "client_us": client / max(1, jobs) * 1e6,
                "busy": (cpu + children + client) / elapsed,
                "statuses": statuses, "ok": statuses.get("Succeeded", 0) == jobs + 1 and jobs >= count}

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

    def figure3(self) -> None:
        runs = 50 if self.quick else 200
        warm = 10
        base = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(["sh", "-c", "true"], check=True)
            base.append((time.perf_counter() - start) * 1000)
        server = self.app("fig3-app", TRUE_TEMPLATE, "--workers", str(WORKERS))
        ours = []
        try:
            connection = Connection(server.port)
            server.profile(self.profile_dir, "fig3")
            for index in range(warm + runs):
                start = time.perf_counter()
                token = trigger(connection, "truejob")
                status = wait_final(connection, token, 10)
                elapsed = (time.perf_counter() - start) * 1000
                if status != "Succeeded":
                    raise RuntimeError(f"job {token} ended {status}")
                if index >= warm:
                    ours.append(elapsed)
            connection.close()
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

    # 4 and 5. Log ingestion, then serving that log.

    def figures4_5(self, show4: bool, show5: bool) -> None:
        lines = 200_000 if self.quick else 1_000_000
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
        '''
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
        finally:
            server.stop()

    def figure5(self, server: App, token: str, lines: int) -> None:
        status_path = Path(f"/proc/{server.pid}/status")

        def memory() -> dict[str, int]:
            fields = {}
            for line in status_path.read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":")
                    fields[name] = int(value.split()[0]) * 1024
            return fields

        time.sleep(0.2)  # the ingestion's buffers settle (memory is read, nothing waits on it)
        try:  # reset the peak (VmHWM) to the current RSS, so that the peak of this request shows
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        before = memory()
        peak = [before["VmRSS"]]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], memory()["VmRSS"])
                except (OSError, KeyError):
                    return
                done.wait(0.005)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        count = size = 0
        last = b""
        start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            connection.request("GET", f"/api/jobs/logs?token={token}")
            response = connection.getresponse()
            header_offset = response.getheader("X-Log-Offset")
            while chunk := response.read(65536):
                count += chunk.count(b"\n")
                size += len(chunk)
                last = (last + chunk)[-64:]
            connection.close()
        finally:
            elapsed = time.perf_counter() - start
            done.set()
            poller.join(5)
        after = memory()
        top = max(peak[0], after["VmHWM"] if reset else 0)
        growth = (top - before["VmRSS"]) / 1e6
        last_line = last.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode()
        ok = response.status == 200 and count == lines and last_line == f"INFO: {lines}"
        note(f"fig 5: {count} lines ({size / 1e6:.1f} MB) in {elapsed:.2f} s ({count / elapsed:,.0f} lines/s), "
             f"HTTP {response.status}, X-Log-Offset {header_offset}, last line {last_line!r}; RSS before "
             f"{before['VmRSS'] / 1e6:.1f} MB, peak {top / 1e6:.1f} MB (polled {peak[0] / 1e6:.1f}, "
             f"VmHWM {'reset' if reset else 'not reset'} {after['VmHWM'] / 1e6:.1f}), after {after['VmRSS'] / 1e6:.1f} MB")
        row(f"5. RSS growth serving the {lines:,}-line log", f"{growth:.1f} MB" + ("" if ok else f" ({count} lines!)"),
            f"{before['VmRSS'] / 1e6:.1f} MB before", f"{top / before['VmRSS']:.2f}", "< 50 MB growth",
            ok and growth < 50)

    # 6. Status lookups/s, 1,000 vs 1,000,000 jobs.

    def figure6(self) -> None:
        small, large = 1000, (100_000 if self.quick else 1_000_000)
        templates = LOG_TEMPLATE
        servers, results = {}, {small: [], large: []}
        try:
            for size in (small, large):
                db = self.workdir / f"status-{size}.db"
                start = time.perf_counter()
                build_database(db, size)
                note(f"fig 6: built a database of {size:,} jobs in {time.perf_counter() - start:.1f} s "
                     f"({db.stat().st_size / 1e6:.0f} MB)")
                servers[size] = self.app(f"fig6-app-{size}", templates, "--workers", str(WORKERS), db=db)
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


def build_database(path: Path, jobs: int) -> None:
    """A job store made by schema.sql with `jobs` Succeeded jobs (tokens 1..jobs), inserted directly."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.executescript(SCHEMA.read_text())
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("BEGIN")
        version = connection.execute(
            "INSERT INTO template_versions (name, definition, key_digest) VALUES ('logjob', '{}', '')"
        ).lastrowid
        now = time.time()
        connection.executemany(
            "INSERT INTO jobs (id, template_version, template, status, variables, created_at, started_at, finished_at)"
            " VALUES (?, ?, 'logjob', 'Succeeded', '{}', ?, ?, ?)",
            ((i, version, now - 1, now - 1, now) for i in range(1, jobs + 1)),
        )
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


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
    widths = [max(len(r[i]) for r in [header, *ROWS]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts and shorter loads, for a smoke run")
    parser.add_argument("--only", help="comma-separated figure numbers (1-7) to run")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python client even where wrk is installed")
    parser.add_argument("--py-spy", metavar="DIR", help="record each app.py server with py-spy (raw stacks) into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (printed at the end)")
    options = parser.parse_args(argv)
    wanted = set(range(1, 8))
    if options.only:
        wanted = {int(part) for part in options.only.split(",") if part.strip()}
        if not wanted <= set(range(1, 8)):
            parser.error("--only takes figure numbers from 1 to 7")

    workdir = Path(tempfile.mkdtemp(prefix="otter-bench-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    bench = Bench(options, workdir)
    failures = 0
    try:
        steps = [
            (1, bench.figure1), (2, bench.figure2), (3, bench.figure3),
            (4, lambda: bench.figures4_5(4 in wanted, 5 in wanted)), (6, bench.figure6), (7, bench.figure7),
        ]
        for number, step in steps:
            if number not in wanted and not (number == 4 and 5 in wanted):
                continue
            print(f"running figure {number if number != 4 else '4/5'} ...", file=sys.stderr, flush=True)
            try:
                step()
            except Exception as error:  # one broken figure must not hide the others
                failures += 1
                row(f"{number}. (failed)", f"error: {error}"[:100], "-", "-", "-", False)
                for server in bench.servers:
                    tail = server.log_tail(600)
                    if tail.strip() and server.process is not None and server.process.returncode not in (0, None, -15):
                        note(f"{server.name} log tail: {tail!r}")
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
    print()
    for line in machine():
        print(line)
    print(f"load: wrk={'yes' if bench.use_wrk else 'no (python client)'}; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}; total {time.perf_counter() - started:.0f} s; "
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

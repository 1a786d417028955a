"""Several real `python app.py` instances sharing one PostgreSQL database (a server the suite starts itself):
exactly-once runs, max_concurrent across instances, kill -9 and SIGSTOP of an instance, cancel and wait across
instances (also after the listening connection was killed), SIGTERM of one instance, a shared port, and
PostgreSQL restarted under load."""

import http.client
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import alive, assert_gone, dir_template, query, read_pid, wait_for, wait_for_log

FINAL = ("Succeeded", "Warning", "Error")
QUICK = '[quick]\n[[quick.steps]]\nlog = "quick"\n'  # a job that ends at once, for "the instance still serves"


@pytest.fixture
def cluster(postgres_url, start_server):
    """cluster(templates, count, *args) -> [ServerProcess], all on one fresh PostgreSQL database."""

    def start(templates: str, count: int, *args: str):
        return [start_server(templates, *args, db=postgres_url) for _ in range(count)]

    start.url = postgres_url
    return start


def owner_of(url: str, servers, token) -> object:
    """The server whose instance claimed the job."""
    (pid,) = query(url, "SELECT i.pid FROM jobs j JOIN instances i ON i.id = j.owner WHERE j.id = ?", int(token))[0]
    return next(server for server in servers if server.process.pid == pid)


def unfinished(url: str) -> int:
    return query(url, "SELECT count(*) FROM jobs WHERE status IN ('Pending', 'Executing')")[0][0]


RECORD = dir_template("record", 'echo "$JobToken" >> "$Dir/tokens"')


def test_each_job_runs_exactly_once_across_three_instances(cluster, tmp_path):
    servers = cluster(RECORD, 3, "--workers", "4")
    tokens = [servers[n % 3].trigger("record", Dir=str(tmp_path)) for n in range(600)]
    assert len(set(tokens)) == 600
    wait_for(lambda: unfinished(cluster.url) == 0, 60, interval=0.1, what="all 600 jobs to end")
    ran = (tmp_path / "tokens").read_text().split()
    assert sorted(ran, key=int) == sorted(tokens, key=int), "each job ran once: none twice, none missing"
    owners = query(cluster.url, "SELECT owner, count(*) FROM jobs GROUP BY owner")
    assert len(owners) == 3, f"every instance claimed jobs: {owners}"
    # A token from one instance is valid on all, and every instance answers alike.
    for token in tokens[::97]:
        answers = {(server.get("/api/jobs/status", token=token)[1], server.get("/api/jobs/logs", token=token)[1])
                   for server in servers}
        assert answers == {("Succeeded", "")}, answers
        pages = {server.get(f"/jobs/{token}")[0] for server in servers}
        assert pages == {200}


SERIAL = dir_template("serial", 'echo "$JobToken start $(date +%s.%N)" >> "$Dir/runs"; sleep 0.1;'
                                ' echo "$JobToken end $(date +%s.%N)" >> "$Dir/runs"', fields="max_concurrent = 1")


def test_max_concurrent_holds_across_instances(cluster, tmp_path):
    servers = cluster(SERIAL, 3, "--workers", "4")
    tokens = [servers[n % 3].trigger("serial", Dir=str(tmp_path)) for n in range(15)]
    for token in tokens:
        assert servers[0].final_status(token) == "Succeeded"
    intervals = {}
    for line in (tmp_path / "runs").read_text().splitlines():
        token, what, at = line.split()
        intervals.setdefault(token, {})[what] = float(at)
    spans = sorted((run["start"], run["end"]) for run in intervals.values())
    assert len(spans) == 15
    started = sorted(intervals, key=lambda token: intervals[token]["start"])
    assert started == sorted(tokens, key=int), "they started in trigger order"
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, f"two jobs of a max_concurrent = 1 template overlapped: {spans}"
    assert len(query(cluster.url, "SELECT DISTINCT owner FROM jobs")) > 1, "the jobs were shared out"


LONG = (dir_template("long", 'echo $$ > "$Dir/$JobToken.pid"; echo "$JobToken" >> "$Dir/started"; echo started;'
                            ' sleep 300')
        + dir_template("gated", 'echo $$ > "$Dir/$JobToken.pid"; echo started; sleep 300', fields="max_concurrent = 1")
        + QUICK)


@pytest.mark.alone
def test_kill_9_of_an_instance_ends_its_jobs_and_kills_their_processes(cluster, tmp_path, leftovers):
    servers = cluster(LONG, 3, "--lease", "2", "--workers", "3")
    tokens = [servers[n % 3].trigger("long", Dir=str(tmp_path)) for n in range(6)]
    pids = {token: read_pid(tmp_path / f"{token}.pid") for token in tokens}
    leftovers += list(pids.values())
    victim = owner_of(cluster.url, servers, tokens[0])
    victims = [token for token in tokens if owner_of(cluster.url, servers, token) is victim]
    others = [server for server in servers if server is not victim]
    killed_at = time.monotonic()
    victim.kill()

    for token in victims:
        assert others[0].final_status(token, timeout=15) == "Error"
        assert "stopped renewing its lease" in others[1].get("/api/jobs/logs", token=token)[1]
    ended_after = time.monotonic() - killed_at
    assert ended_after < 2 + 1 + 2, f"ended {ended_after:.1f} s after the kill: the lease (2 s) plus one sweep"
    assert_gone(*(pids[token] for token in victims))
    def told(token) -> int:
        return "".join(server.stderr() for server in others).count(
            f"job finished: token={token} template=long status=Error duration=")

    for token in victims:  # said once, by the instance that ended it, and counted there
        wait_for(lambda: told(token) >= 1, 5, what=f"the end of job {token} to be told")
        assert told(token) == 1
    counted = sum(float(value) for server in others for value in re.findall(
        r'jobserver_jobs_finished_total\{status="Error",template="long"\} ([0-9.]+)', server.get("/metrics")[1]))
    assert counted == len(victims), "summed over the instances, as the README says"
    survivors = [token for token in tokens if token not in victims]
    assert all(alive(pids[token]) for token in survivors), "the other instances' jobs go on"
    assert all(others[0].get("/api/jobs/status", token=t)[1] == "Executing" for t in survivors)
    assert others[1].final_status(others[1].trigger("quick")) == "Succeeded", "the others keep serving"
    started = (tmp_path / "started").read_text().split()
    assert sorted(started) == sorted(tokens), "nothing ran twice (no job is started again automatically)"


TICKING = (dir_template("ticking", 'echo $$ > "$Dir/$JobToken.pid"; while true; do echo tick; sleep 0.1; done')
           + dir_template("quiet", 'echo $$ > "$Dir/$JobToken.pid"; echo tick; exec sleep 60')
           + QUICK)


# ticking: the paused instance finds out from its next log write; quiet: from its final status, once the
# other instance killed the job's process
@pytest.mark.parametrize("template", ["ticking", "quiet"])
def test_an_instance_paused_past_its_lease_changes_nothing_when_it_comes_back(cluster, tmp_path, leftovers,
                                                                              template):
    first, second = cluster(TICKING, 2, "--lease", "2", "--workers", "1")
    token = first.trigger(template, Dir=str(tmp_path))
    pid = read_pid(tmp_path / f"{token}.pid")
    leftovers.append(pid)
    paused = owner_of(cluster.url, (first, second), token)
    other = second if paused is first else first
    wait_for_log(other, token, "tick")
    paused.signal(signal.SIGSTOP)
    try:
        assert other.final_status(token, timeout=15) == "Error"
        assert_gone(pid)  # the instance that ended the job killed its process: it ran on this machine
        log_before = other.get("/api/jobs/logs", token=token)[1]
        assert "stopped renewing its lease" in log_before
    finally:
        paused.signal(signal.SIGCONT)
    wait_for(lambda: "serving as a new instance" in paused.stderr(), 10, what="the paused instance to notice")
    wait_for(lambda: f"job ended by another instance: token={token} " in paused.stderr(), 10,
             what="the paused instance to say it no longer ran the job")
    assert f"job finished: token={token} " not in paused.stderr(), "nor does it claim to have finished it"
    assert other.get("/api/jobs/logs", token=token)[1] == log_before, "its late writes changed nothing"
    assert other.get("/api/jobs/status", token=token)[1] == "Error"
    assert paused.final_status(paused.trigger("quick")) == "Succeeded", "it serves again, as a new instance"


def terminate_listeners(url: str) -> int:
    return query(url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                      " WHERE application_name = 'jobserver-listen'")[0][0]


def heard(url: str, act, seconds: float = 1.5) -> list[str]:
    """The notifications on the server's channel while act() runs and for `seconds` after."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("LISTEN jobserver")
        act()
        return [note.payload for note in db.notifies(timeout=seconds)]


# Limited, so that each trigger is queued: one handed to an idle worker as it is committed is no news to others.
QUEUED = dir_template("record", 'echo "$JobToken" >> "$Dir/tokens"', fields="max_concurrent = 10")


def test_a_lone_instance_announces_no_work_and_starts_when_another_comes(cluster, tmp_path):
    # --lease 5: renewed every 0.5 s, and with it the count of the other instances alive
    first, = cluster(QUEUED, 1, "--lease", "5")
    wait_for(lambda: not [p for p in heard(cluster.url, lambda: first.trigger("record", Dir=str(tmp_path)), 0.3)
                          if p.startswith("work ")], 10, what="the lone instance to stop announcing work")
    second, = cluster(QUEUED, 1, "--lease", "5")
    wait_for(lambda: [p for p in heard(cluster.url, lambda: first.trigger("record", Dir=str(tmp_path)), 0.3)
                      if p.startswith("work ")], 10, what="the first instance to announce work again")
    token = first.trigger("record", Dir=str(tmp_path))
    assert second.final_status(token) == "Succeeded"


@pytest.mark.alone
@pytest.mark.parametrize("listeners", ["listening", "listeners-killed"])
def test_cancel_and_wait_reach_the_instance_running_the_job(cluster, tmp_path, leftovers, listeners):
    servers = cluster(LONG, 2, "--workers", "1", "--cancel-grace", "1")
    token = servers[0].trigger("long", Dir=str(tmp_path))
    pid = read_pid(tmp_path / f"{token}.pid")
    leftovers.append(pid)
    owner = owner_of(cluster.url, servers, token)
    elsewhere = next(server for server in servers if server is not owner)
    if listeners == "listeners-killed":
        assert terminate_listeners(cluster.url) == 2
    answers = {}

    def follow():
        started = time.monotonic()
        answers["status"] = elsewhere.get("/api/jobs/status", token=token, wait=30)[1]
        answers["after"] = time.monotonic() - started

    follower = threading.Thread(target=follow)
    follower.start()
    wait_for(lambda: query(cluster.url, "SELECT 1 FROM jobs WHERE id = ?", int(token)), 5)
    canceled_at = time.monotonic()
    status, body, _ = elsewhere.get("/api/jobs/cancel", token=token)
    took = time.monotonic() - canceled_at
    assert (status, body) == (200, "Error")
    assert took < 2.0, f"the cancel reached the other instance and the job ended in {took:.2f} s"
    assert_gone(pid)
    follower.join(10)
    assert answers["status"] == "Error" and answers["after"] - took < 1.5, answers
    assert elsewhere.get("/api/jobs/logs", token=token)[1].endswith("ERROR: Job canceled\n")


def test_sigterm_of_one_instance_leaves_its_pending_jobs_to_the_others(cluster, tmp_path, leftovers):
    servers = cluster(LONG, 2, "--workers", "2", "--grace", "0.5")
    running = servers[0].trigger("gated", Dir=str(tmp_path))
    leftovers.append(read_pid(tmp_path / f"{running}.pid"))
    waiting = servers[0].trigger("gated", Dir=str(tmp_path))  # Pending: max_concurrent = 1
    assert servers[1].get("/api/jobs/status", token=waiting)[1] == "Pending"
    leaving = owner_of(cluster.url, servers, running)
    staying = next(server for server in servers if server is not leaving)
    assert leaving.stop() == 0
    assert staying.get("/api/jobs/status", token=running)[1] == "Error"
    assert "Server stopped while the job ran" in staying.get("/api/jobs/logs", token=running)[1]
    wait_for_log(staying, waiting, "started")  # the job the stopped instance left Pending runs on the other
    assert owner_of(cluster.url, servers, waiting) is staying
    leftovers.append(read_pid(tmp_path / f"{waiting}.pid"))


def test_instances_can_share_one_port(cluster):
    # The first takes a free port itself, so that no other process can take it between a probe and the bind.
    [first] = cluster(LONG, 1, "--reuse-port")
    port = first.port
    servers = [first, *cluster(LONG, 1, "--reuse-port", "--port", str(port))]
    assert {server.port for server in servers} == {port}
    for _ in range(60):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/jobs/trigger?template=quick")
        assert connection.getresponse().status == 200
        connection.close()
    wait_for(lambda: unfinished(cluster.url) == 0, 20, what="the quick jobs to end")
    for server in servers:  # the kernel spread connections over both instances
        wait_for(lambda: "job triggered" in server.stderr(), 5, what="a trigger on each instance")


def test_postgresql_restarted_under_load_gives_only_503s_and_loses_nothing(cluster, postgres, tmp_path):
    servers = cluster(RECORD, 2, "--workers", "2")
    accepted, refusals, others = [], [], []
    stop = threading.Event()

    def client(index: int) -> None:
        server = servers[index % 2]
        for _ in range(2000):
            if stop.is_set():
                return
            status, body, headers = server.get("/api/jobs/trigger", template="record", Dir=str(tmp_path))
            if status == 200:
                accepted.append(body)
            elif status == 503 and "Retry-After" in headers:
                refusals.append(body)
            else:
                others.append((status, body))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(accepted) >= 50, 20, what="jobs before the restart")
        postgres.restart(downtime=1.0)
        before = len(accepted)
        wait_for(lambda: len(accepted) >= before + 50, 30, what="jobs accepted after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not others, others[:3]
    wait_for(lambda: unfinished(cluster.url) == 0, 60, interval=0.1, what="every accepted job to end")
    ran = (tmp_path / "tokens").read_text().split()
    assert len(ran) == len(set(ran)), "no job ran twice"
    assert set(accepted) <= set(ran), "every accepted job ran"
    statuses = dict(query(cluster.url, "SELECT id, status FROM jobs"))
    assert all(statuses[int(token)] == "Succeeded" for token in accepted)
    print(f"\nPostgreSQL restart under load: {len(accepted)} accepted, {len(refusals)} answered 503")


CHATTY = dir_template("chatty", 'i=0; while [ ! -e "$Dir/go" ]; do echo "line $i"; i=$((i+1)); sleep 0.1; done;'
                                ' echo "lines: $i"')


@pytest.mark.alone
def test_a_running_job_goes_on_through_a_postgresql_outage_shorter_than_the_lease(cluster, postgres, tmp_path):
    # --lease 16: renewed every 1.6 s, jobs stopped 12 s after the last renewal. An outage of 7 s is shorter,
    # however the pool's reconnect back-off (1, 2, 4, 8 s...) falls: the lease is renewed within a second of
    # the database's return, on a connection of its own.
    [server] = cluster(CHATTY, 1, "--lease", "16")
    token = server.trigger("chatty", Dir=str(tmp_path))
    wait_for_log(server, token, "line 5")
    outage = threading.Thread(target=postgres.restart, kwargs={"downtime": 7.0})
    outage.start()
    try:
        answers = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (answers and answers[-1][0] == 503):
            asked = time.monotonic()
            answers.append((server.get("/healthz")[0], time.monotonic() - asked))
        assert answers[-1][0] == 503, "the health check tells of the outage"
        assert max(took for _, took in answers) < 2.5, f"and answers soon: {answers}"
    finally:
        outage.join(30)
    wait_for(lambda: server.get("/healthz")[:2] == (200, "ok"), 20, what="the health check after the outage")
    (tmp_path / "go").touch()
    assert server.final_status(token, timeout=20) == "Succeeded", server.get("/api/jobs/logs", token=token)[1]
    lines = server.get("/api/jobs/logs", token=token)[1].splitlines()
    printed = int(lines[-1].removeprefix("INFO: lines: "))
    assert lines == [f"INFO: line {n}" for n in range(printed)] + [f"INFO: lines: {printed}"], "none lost"


def postgresql_processes(postmaster: int) -> list[int]:
    """The postmaster and its children (backends, background workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{postmaster}\n" in status:
                children.append(int(entry))
    return [postmaster, *children]


@pytest.mark.alone
def test_the_health_check_answers_within_seconds_while_postgresql_hangs(cluster, postgres):
    # A server that hangs (stopped, or cut off without a reset) rather than refuses: the check must not hang
    # with it, however many times a load balancer asks.
    [server] = cluster(QUICK, 1)
    assert server.get("/healthz")[:2] == (200, "ok")
    processes = postgresql_processes(postgres._process.pid)  # each backend is a session of its own
    for pid in processes:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(2):  # the second while the first's read still hangs
            asked = time.monotonic()
            status, body, _ = server.get("/healthz")
            took = time.monotonic() - asked
            assert status == 503 and "does not answer" in body and took < 3, (status, body, took)
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: server.get("/healthz")[:2] == (200, "ok"), 20, what="the health check once it answers")


def test_an_unreachable_database_stops_start_up_with_one_line(start_server, tmp_path):
    from conftest import ServerProcess

    server = ServerProcess(tmp_path, LONG, db="postgresql://postgres@127.0.0.1:9/none")
    with pytest.raises(AssertionError, match="server did not start"):
        server.start(timeout=20)
    assert server.process.wait(20) == 2
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("app.py: error: cannot use the database"), lines
    server.close_files()

"""The command line, in process through app.main([...]): start-ups that fail say why in one line on stderr and
exit with code 2 (a templates file with a problem, a database that cannot be used, a port in use, a bad option
value), --help names every option, and the options' defaults are the documented ones. One real process shows
that the exit code and the line reach the shell.

The options of the request guard (hosts, origins, followers, connections) are in test_guard.py; a second
instance started against a running server is in test_server.py."""

import re
import socket
import subprocess
import sys

import pytest

import app as server_module
from conftest import ROOT, assert_one_clear_line

GOOD_TEMPLATES = """
[hello]
[[hello.steps]]
log = "hi"
"""


@pytest.fixture
def templates(tmp_path):
    """A good templates file; a test writes another text into it where that is what it tests."""
    path = tmp_path / "templates.toml"
    path.write_text(GOOD_TEMPLATES)
    return path


def start_args(templates, db, *more) -> list[str]:
    return ["--port", "0", "--templates", str(templates), "--db", str(db), *more]


#
# Start-ups that fail.
#


def test_malformed_toml_names_file_and_line(run_main, templates, tmp_path):
    templates.write_text('[hello]\ndescription = "fine"\n\n[[hello.steps]\nlog = "hi"\n')
    line = assert_one_clear_line(*run_main(*start_args(templates, tmp_path / "jobs.db")), str(templates))
    assert re.search(r"line 4\b", line), line


def test_a_failed_start_lets_the_database_go(run_main, templates, tmp_path):
    """The lock that keeps a second server off the database is let go when start-up fails: a second try in
    the same process names the same problem, not "another app.py is serving it"."""
    templates.write_text("[broken\n")
    first = run_main(*start_args(templates, tmp_path / "jobs.db"))
    second = run_main(*start_args(templates, tmp_path / "jobs.db"))
    assert first == second and "invalid TOML" in first[2], (first, second)


@pytest.mark.parametrize("toml, field", [
    ('[hello]\ncolour = "red"\n[[hello.steps]]\nlog = "x"\n', "colour"),
    ('[hello]\n[[hello.steps]]\nlog = "x"\nrun = "true"\n', "steps[0]"),
    ('[hello]\n[[hello.steps]]\nlog = "x"\nlevel = "LOUD"\n', "level"),
    ('[hello]\n[hello.variables]\nA = { pattern = "(" }\n[[hello.steps]]\nlog = "x"\n', "pattern"),
    ('[hello]\n[[hello.steps]]\nlog = "$Nowhere"\n', "Nowhere"),
])
def test_invalid_template_field_is_named(run_main, templates, tmp_path, toml, field):
    templates.write_text(toml)
    assert_one_clear_line(*run_main(*start_args(templates, tmp_path / "jobs.db")), "hello", field)


def test_a_missing_templates_file_is_named(run_main, tmp_path):
    missing = tmp_path / "nowhere.toml"
    assert_one_clear_line(*run_main(*start_args(missing, tmp_path / "jobs.db")), str(missing))


@pytest.mark.parametrize("where", ["missing-directory", "directory"])
def test_unwritable_database_path(run_main, templates, tmp_path, where):
    db = tmp_path / "no" / "such" / "dir" / "jobs.db" if where == "missing-directory" else tmp_path
    assert_one_clear_line(*run_main(*start_args(templates, db)), str(db))


def test_an_unreachable_postgresql_database_is_named_without_its_password(run_main, templates):
    url = "postgresql://someone:hunter2@127.0.0.1:9/jobs"
    line = assert_one_clear_line(*run_main(*start_args(templates, url, "--busy-timeout", "1")),
                                 "postgresql://someone:***@127.0.0.1:9/jobs")
    assert "hunter2" not in line


@pytest.mark.parametrize("url, password", [
    ("postgresql://someone:hunter2@[::1/jobs", "hunter2"),  # a malformed IPv6 host
    ("postgresql://someone:hunter2%ZZ@127.0.0.1:9/jobs", "hunter2"),  # a bad percent-encoding, quoted back
    ("postgresql://someone@127.0.0.1:9/jobs?password=hunter2", "hunter2"),
    ("postgresql://someone@127.0.0.1:9/jobs?pass%77ord=hunter2", "hunter2"),  # the driver decodes the name
    ("postgresql://someone@127.0.0.1:9/jobs?password=hunt%20er2", "hunt er2"),
    ("postgresql://someone:hunt er2@127.0.0.1:9/jobs", "er2"),  # a space, which the driver quotes back
    ("postgresql://someone:hunter2\t@127.0.0.1:9/jobs", "hunter2"),
    ("postgresql://someone:hunter2@127.0.0.1:9/jobs?bogus=1", "hunter2"),
])
def test_a_malformed_postgresql_url_is_refused_without_its_password(run_main, templates, url, password):
    line = assert_one_clear_line(*run_main(*start_args(templates, url, "--busy-timeout", "1")), "***")
    assert password not in line and "hunt" not in line


@pytest.mark.parametrize("url, shown", [
    ("postgresql://jobs:hunter2@db.example:5432/jobs", "postgresql://jobs:***@db.example:5432/jobs"),
    ("postgresql://jobs@db.example/jobs?sslmode=require&pass%77ord=hunter2",
     "postgresql://jobs@db.example/jobs?sslmode=require&pass%77ord=***"),
    ("postgresql://jobs:p@ss@db.example/jobs", "postgresql://jobs:***@db.example/jobs"),
    ("postgresql://jobs@db.example/jobs", "postgresql://jobs@db.example/jobs"),
    ("/var/lib/jobserver/jobs.db", "/var/lib/jobserver/jobs.db"),
])
def test_the_start_up_line_shows_the_database_without_its_password(url, shown):
    assert server_module.redacted(url) == shown


def test_port_in_use(run_main, templates, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_main("--port", str(port), "--templates", str(templates), "--db", str(tmp_path / "jobs.db"))
    assert_one_clear_line(*result, str(port))
    assert not (tmp_path / "jobs.db").exists(), "the port is taken before the database is touched"


def test_a_real_process_exits_2_with_the_line(templates, tmp_path):
    templates.write_text('[hello]\n[[hello.steps]]\nlog = "x"\nlevel = "LOUD"\n')
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), *start_args(templates, tmp_path / "jobs.db")],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert_one_clear_line(result.returncode, result.stdout, result.stderr, "hello", "level")


#
# Options: bad values, --help, defaults.
#


@pytest.mark.parametrize("option, value", [
    ("--port", "70000"), ("--port", "-1"), ("--port", "http"),
    ("--workers", "0"), ("--workers", "two"),
    ("--grace", "-1"), ("--grace", "inf"), ("--grace", "nan"),
    ("--cancel-grace", "-0.5"), ("--cancel-grace", "forever"),
    ("--busy-timeout", "0"), ("--busy-timeout", "-1"),
    ("--max-body", "0"), ("--max-body", "1MiB"),
    ("--max-pending", "0"),
    ("--keep-days", "0"), ("--keep-days", "nan"),
    ("--lease", "0"), ("--lease", "inf"),
    ("--db-connections", "0"),
    ("--log-level", "loud"), ("--log-format", "xml"),
])
def test_a_bad_option_value_is_one_line_and_exit_2(run_main, option, value):
    assert_one_clear_line(*run_main(option, value), option)


def test_an_unknown_option_is_one_line_and_exit_2(run_main):
    assert_one_clear_line(*run_main("--colour", "red"), "--colour")


def test_help_names_every_option_and_exits_zero(run_main):
    code, out, err = run_main("--help")
    assert (code, err) == (0, "")
    for option in ("--host", "--port", "--reuse-port", "--templates", "--db", "--workers", "--http-threads",
                   "--max-followers", "--max-connections", "--idle-timeout", "--grace", "--cancel-grace",
                   "--busy-timeout", "--max-body", "--max-pending", "--keep-days", "--lease", "--db-connections",
                   "--allowed-host", "--allow-origin", "--log-level", "--log-format"):
        assert option in out, option


def test_the_defaults_are_the_documented_ones(monkeypatch):
    monkeypatch.delenv("JOBSERVER_DB", raising=False)
    args = server_module.build_parser().parse_args([])
    assert (args.host, args.port, args.workers, args.http_threads) == ("127.0.0.1", 8080, 4, 16)
    assert (args.grace, args.cancel_grace, args.busy_timeout, args.lease) == (30, 5, 5, 20)
    assert (args.max_body, args.max_pending, args.keep_days) == (1024 * 1024, 10000, 30)
    assert args.templates == str(ROOT / "templates.toml") and args.db == str(ROOT / "jobs.db")
    assert (args.log_level, args.log_format) == ("info", "text")


def test_the_database_defaults_to_JOBSERVER_DB(monkeypatch):
    monkeypatch.setenv("JOBSERVER_DB", "postgresql://jobs@db.internal/jobs")
    assert server_module.build_parser().parse_args([]).db == "postgresql://jobs@db.internal/jobs"

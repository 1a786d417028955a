"""A job orchestration server that speaks Inedo Otter's Job Orchestration API.

Shell scripts and other tools trigger the named jobs of templates.toml, poll their status and read their logs:

    GET|POST /api/jobs/trigger?template=NAME&key=KEY    -> the job token
    GET|POST /api/jobs/status?token=TOKEN&key=KEY       -> Pending | Executing | Succeeded | Warning | Error
    GET|POST /api/jobs/logs?token=TOKEN&key=KEY         -> one "LEVEL: message" line per log entry

Extensions that Otter clients never see unless they ask: ``offset`` and ``wait`` on logs, ``wait`` on status,
/api/jobs/cancel, /api/templates, /healthz, /metrics, and a web page at / for people. Jobs live in SQLite
(schema.sql, beside this file) or, for several instances sharing the work, in PostgreSQL
(schema-postgresql.sql); a pool of worker threads runs them. Run ``python app.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import logging.handlers
import os
import queue
import re
import resource
import secrets as secrets_module
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import traceback
import urllib.parse
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from flask import Blueprint, Flask, Response, current_app, redirect, render_template, request, url_for
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException, NotFound

#
# Constants and status words.
#

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "schema.sql"
POSTGRES_SCHEMA_PATH = HERE / "schema-postgresql.sql"
WEB_PATH = HERE / "web"  # the page's HTML templates and its one script and style sheet

PENDING, EXECUTING, SUCCEEDED, WARNING, ERROR = "Pending", "Executing", "Succeeded", "Warning", "Error"
STATUSES = (PENDING, EXECUTING, SUCCEEDED, WARNING, ERROR)
FINAL_STATUSES = frozenset({SUCCEEDED, WARNING, ERROR})
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")  # in rising severity
LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}
STATUS_BY_WORST_LEVEL = {"DEBUG": SUCCEEDED, "INFO": SUCCEEDED, "WARN": WARNING, "ERROR": ERROR}

API_PARAMETERS = ("template", "key", "token")  # reserved as variable names everywhere
TRIGGER_PARAMETERS = ("template", "key")  # what trigger reads; any other parameter is a variable
JOB_PARAMETERS = ("token", "key")  # what status, logs and cancel read
BUILTIN_VARIABLES = ("JobToken", "TemplateName", "JobInstance")
BUILTIN_NAMES = frozenset(name.lower() for name in BUILTIN_VARIABLES)
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")
# $Name, ${Name}, or $$ for a literal dollar sign.
REFERENCE_PATTERN = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)|\$)")
# Names that change how programs run, refused as variables wherever they come from (compared in lower case).
# Beyond the issue's list: the names through which glibc loads code or files into any program (glibc's own
# list of variables unsafe for setuid programs, and the locale and time zone names, which may be paths).
FORBIDDEN_NAMES = frozenset(
    "path home shell user ifs env bash_env cdpath ps4 shellopts bashopts tmpdir"
    " gconv_path getconf_dir glibc_tunables hostaliases localdomain locpath nis_path nlspath res_options"
    " resolv_host_conf tzdir tz lang language".split()
)
FORBIDDEN_PREFIXES = ("ld_", "dyld_", "bash_", "python", "perl", "ruby", "node_", "git_", "ssh_", "lc_",
                      "malloc_")
FORBIDDEN_SUFFIXES = ("_proxy",)

MAX_VALUE_BYTES = 8 * 1024
MAX_VARIABLES = 100
MAX_PARAMETERS = 200  # parsed at most, so that a flood of fields costs nothing
MAX_WAIT_SECONDS = 60.0
MAX_LINE_BYTES = 64 * 1024  # a longer line of output is stored as entries of at most this much
DEFAULT_MAX_LOG_BYTES = 10 * 1024 * 1024

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
LEFTOVER_GRACE = 1.0  # seconds a step's leftover processes may hold its output open after it exited
LOG_FLUSH_SECONDS = 0.05  # a running job's output reaches the database at least this often
LOG_FLUSH_ENTRIES = 5000
MAX_UNSTORED_ENTRIES = 100_000  # a job's log kept in memory while the store is away; past it the job stops
POLL_SECONDS = 0.1  # how often a running step looks at its deadline and at stop requests
RECHECK_SECONDS = 0.5  # how often an instance re-reads what notifications may have missed
# Characters that some reader of a log could take for a line break, and NUL: never stored as they are.
UNSAFE_CHARACTERS = re.compile("[\x00\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


#
# Settings: every default, in one place, for create_app, the runner and the command line alike.
#


@dataclasses.dataclass(frozen=True)
class Settings:
    """How one server instance runs. create_app takes these as upper-case config keys (DATABASE=...)."""

    database: str = str(HERE / "jobs.db")  # a SQLite path, or a postgresql:// URL
    templates: str = str(HERE / "templates.toml")
    workers: int = 4  # jobs run at once by this instance
    max_body: int = 1024 * 1024  # bytes
    max_pending: int = 10000  # Pending jobs before triggers get 503
    keep_days: float = 30.0  # finished jobs and their logs are deleted after this
    grace: float = 30.0  # seconds running jobs get to finish at shutdown
    cancel_grace: float = 5.0  # seconds between SIGTERM and SIGKILL when a job is canceled
    busy_timeout: float = 5.0  # seconds a write waits for a lock before it fails (503)
    lease: float = 20.0  # seconds an instance's lease lasts; it renews it every tenth of that
    http_threads: int = 16  # threads for ordinary requests
    max_followers: int = 1000  # requests held by `wait` at once, each on a thread of its own
    max_connections: int = 4000  # open HTTP connections
    idle_timeout: float = 10.0  # seconds before a silent connection (idle, or half a request) is closed
    db_connections: int = 10  # PostgreSQL connections in the pool of one instance
    allowed_hosts: tuple[str, ...] = ()  # Host names admitted beyond IP literals and localhost
    allow_origins: tuple[str, ...] = ()  # other origins whose pages may post here
    public_names: tuple[str, ...] = ()  # this machine's names, admitted when listening beyond loopback
    key_failures: int = 20  # failed key checks a client address may make in a minute

    @classmethod
    def from_config(cls, config: dict | None) -> Settings:
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {name.lower(): value for name, value in (config or {}).items() if name.lower() in fields}
        for name in ("allowed_hosts", "allow_origins", "public_names"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


DEFAULTS = Settings()


#
# Errors.
#


class ApiError(Exception):
    """A request that cannot be served: an HTTP status and a short plain-text reason."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.headers = message, status, headers or {}


class Refused(Exception):
    """Something the job layers refuse to do; the web layer gives each kind its HTTP status."""

    def __init__(self, message: str, retry_after: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message, self.retry_after, self.field = message, retry_after, field  # field: the variable named


class BadValue(Refused):
    """A request's parameters or variables break a rule (400)."""


class KeyRefused(Refused):
    """A template's key is missing or wrong (403)."""


class NotAccepting(Refused):
    """No new jobs for now: shutting down, or the queue is full (503)."""


class TemplateError(Exception):
    """A templates.toml that cannot be served, naming the file, the template and the field."""


class StoreError(Exception):
    """The job store could not be read or written (a lock, a full disk, a lost database connection)."""


def shown(text: str, limit: int = 40) -> str:
    """A request-supplied name, quoted, shortened and reduced to ASCII, fit to put in an error message."""
    return ascii(text[:limit] + ("..." if len(text) > limit else ""))


#
# Operator events: one line on stderr per thing that happened, as text or JSON.
#

LOG = logging.getLogger("jobserver")


def event(level: int, name: str, message: str, **fields) -> None:
    """Log one event. Fields are names, tokens, counts and reasons: never a key, a secret or a variable's
    value (variable names may appear)."""
    if LOG.isEnabledFor(level):
        LOG.log(level, message, extra={"event": name, "fields": fields})


class TextFormatter(logging.Formatter):
    """2026-12-01 17:36:57 INFO job finished: token=12 template=hdars status=Succeeded duration=0.4"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{name}={text_field(value)}"
                          for name, value in getattr(record, "fields", {}).items() if value is not None)
        message = " ".join(record.getMessage().split())  # one line, whatever a library's message holds
        return f"{stamp} {record.levelname} {message}{': ' + fields if fields else ''}"


def text_field(value) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with stable field names: time, level, event, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname.lower(), "event": getattr(record, "event", record.name),
                "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, default=str)


class DeferredQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writing thread as they are: formatting and the write to stderr happen there,
    not in the request or job thread that logged."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class EventWriter:
    """Writes the queued records to stderr from a thread of its own, every tenth of a second, all that came
    meanwhile in one write: a thread woken at each record would take the interpreter lock from the requests
    three times a job (triggered, started, finished), which slowed a busy server by a tenth."""

    INTERVAL = 0.1

    def __init__(self, records: queue.SimpleQueue, formatter: logging.Formatter):
        self.records, self.formatter = records, formatter
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, and end the thread."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self.INTERVAL):
            self._write_queued()
        self._write_queued()

    def _write_queued(self) -> None:
        lines = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(self.formatter.format(self.records.get_nowait()))
        if lines:
            with contextlib.suppress(OSError, ValueError):  # stderr closed or gone: nothing to tell it
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()


def configure_logging(level: str = "info", form: str = "text") -> EventWriter:
    """Send the server's events to stderr through a queue and a thread of their own; returns the writer
    (stop it to write what is queued)."""
    # What a record costs the thread that logs (the logging HOWTO's "Optimization"): no caller frame, thread
    # or process names, which no event line shows; a third of the cost of each event.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    records: queue.SimpleQueue = queue.SimpleQueue()
    writer = EventWriter(records, JsonFormatter() if form == "json" else TextFormatter())
    threshold = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}[level]
    # The PostgreSQL driver's own messages (the pool's reconnects) go the same way, in the same format; its
    # routine INFO lines only at debug.
    driver = logging.DEBUG if threshold == logging.DEBUG else logging.WARNING
    for logger, least in ((LOG, threshold), (logging.getLogger("psycopg"), driver)):
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(DeferredQueueHandler(records))
        logger.setLevel(least)
        logger.propagate = False
    writer.start()
    return writer

#
# Exec-step check: which arguments of a command are code that a program runs.
#
# An exec step may not put a variable into such an argument, since a request's value would become code: a run
# step passes values to its script as environment variables instead.
#

# A POSIX shell runs its first operand when one of its option clusters has c (-c, -ec); o and O take a value.
SHELLS = frozenset("sh bash dash zsh ksh mksh ash yash".split())


class CodeOptions(NamedTuple):
    """How a program's options take code, by the letters of its short options and the names of its long
    ones."""
    code: str  # code follows: attached (-e'...') where code_attached, else as the next word
    value: str = ""  # another value follows, attached or as the next word
    attached: str = ""  # an optional value follows, attached only (perl -i.bak)
    digits: str = ""  # optional digits follow, then more options (perl -l0ne)
    last: str = ""  # no option comes after this one's value (python -m module args...)
    long_code: tuple[str, ...] = ()  # code follows, as the next word or after =
    long_value: tuple[str, ...] = ()  # another value follows, as the next word or after =
    code_attached: bool = True
    anywhere: bool = False  # options may follow operands too (su USER -c COMMAND)


PYTHON = CodeOptions("c", value="WXm", last="cm")  # what follows -c CODE or -m MODULE is their own
NODE = CodeOptions("ep", value="r", long_code=("--eval", "--print"), code_attached=False,
                   long_value=("--require", "--import", "--loader", "--experimental-loader", "--input-type",
                               "--conditions", "--title"))
SU = CodeOptions("c", value="sgGwu", long_code=("--command", "--session-command"), anywhere=True,
                 long_value=("--shell", "--group", "--supp-group", "--whitelist-environment", "--user"))
INTERPRETERS = {
    "python": PYTHON, "pypy": PYTHON,
    "perl": CodeOptions("eE", value="I", attached="MmxidDCF", digits="0l"),
    "ruby": CodeOptions("e", value="rICE", attached="WxiF", digits="0"),
    "node": NODE, "nodejs": NODE,
    "php": CodeOptions("rBRE", value="cdfz", long_code=("--run", "--process-begin", "--process-code",
                                                        "--process-end")),
    "lua": CodeOptions("e", value="l"),
    "fish": CodeOptions("cC", value="pdo", long_code=("--command", "--init-command"),
                        long_value=("--profile", "--debug", "--debug-output", "--features")),
    "su": SU, "runuser": SU,  # they run -c COMMAND with a shell
    "flock": CodeOptions("c", value="wE", long_code=("--command",),
                         long_value=("--timeout", "--conflict-exit-code"),
                         anywhere=True),  # flock FILE -c COMMAND
    "script": CodeOptions("c", value="ETIOBm", long_code=("--command",), anywhere=True),
    "env": CodeOptions("S", value="uCP", long_code=("--split-string",), long_value=("--unset", "--chdir")),
}
# sudo -s/-i (--shell/--login) runs its whole command line with a shell; these of its options take a value.
SUDO_VALUES = ("uUgpCDhrtT", ("--user", "--other-user", "--group", "--prompt", "--close-from", "--chdir",
                              "--host", "--role", "--type", "--command-timeout"))
# Account tools whose -s/--shell names a login shell to record, not a command to run.
SHELL_SETTERS = frozenset("useradd usermod adduser chsh".split())


def code_arguments(argv: tuple[str, ...]) -> list[tuple[str, int]]:
    """(program, position) of each argument that a command runs as code: a shell's -c script, python's -c,
    perl's -e, su's -c and the like (SHELLS, INTERPRETERS, sudo -s), also behind a wrapper (env, timeout,
    ...)."""
    found = []
    for i, word in enumerate(argv):
        program = re.sub(r"[0-9.]+t?$", "", os.path.basename(word))  # python3.13t, perl5.36 -> python, perl
        if word.startswith("-") or (i and argv[i - 1] in ("-s", "--shell")
                                    and any(os.path.basename(w) in SHELL_SETTERS for w in argv[:i])):
            continue
        if program in SHELLS:
            found += [(word, j) for j in shell_script(argv, i + 1)]
        elif program in INTERPRETERS:
            found += [(word, j) for j in interpreter_code(argv, i + 1, INTERPRETERS[program])]
        elif program == "sudo":
            found += [(word, j) for j in sudo_shell_command(argv, i + 1)]
    return found


def shell_script(argv, first: int) -> list[int]:
    """The position of the script of a POSIX shell whose options start at argv[first], if -c is among them."""
    takes_c = False
    position = first
    while position < len(argv) and argv[position][:1] in ("-", "+") and argv[position] != "--":
        option = argv[position]
        if option in ("--rcfile", "--init-file"):
            position += 1  # their value
        elif not option.startswith("--"):
            takes_c = takes_c or "c" in option
            position += sum(letter in "oO" for letter in option[1:])  # the values of -o and -O, in order
        position += 1
    if position < len(argv) and argv[position] == "--":
        position += 1
    return [position] if takes_c and position < len(argv) else []


def sudo_shell_command(argv, first: int) -> list[int]:
    """The positions of the command words that sudo -s or -i, whose options start at argv[first], joins into
    a shell command line."""
    value_letters, long_values = SUDO_VALUES
    shell = False
    position = first
    while position < len(argv) and argv[position].startswith("-") and argv[position] != "--":
        option = argv[position]
        if option.startswith("--"):
            name, equals, _ = option.partition("=")
            shell = shell or name in ("--shell", "--login")
            position += name in long_values and not equals
        else:
            for index, letter in enumerate(option[1:], 1):
                shell = shell or letter in "si"
                if letter in value_letters:
                    position += index + 1 == len(option)  # the value is the next word
                    break
        position += 1
    if position < len(argv) and argv[position] == "--":
        position += 1
    return list(range(position, len(argv))) if shell else []


def interpreter_code(argv, first: int, options: CodeOptions) -> list[int]:
    """The positions of the code arguments of a program (INTERPRETERS) whose options start at argv[first]."""
    found = []
    position = first
    # su passes what follows -- on to the shell, where -c still counts.
    while position < len(argv) and (argv[position] != "--" or options.anywhere):
        option, value_follows, last = argv[position], False, False
        if not option.startswith("-") or option == "-":  # an operand: the script, or su's user name
            if not options.anywhere:
                break
        elif option.startswith("--"):
            name, equals, _ = option.partition("=")
            if name in options.long_code:
                found.append(position if equals else position + 1)
            value_follows = (name in options.long_code or name in options.long_value) and not equals
        else:
            index = 1
            while index < len(option):
                letter, attached = option[index], index + 1 < len(option)
                if letter in options.code and attached and options.code_attached:
                    found.append(position)
                    last = letter in options.last
                    break
                if letter in options.code:
                    found.append(position + 1)  # and the cluster goes on: node -pe CODE
                    value_follows, last = True, letter in options.last
                elif letter in options.value:
                    value_follows, last = not attached, letter in options.last
                    break
                elif letter in options.attached:
                    break
                elif letter in options.digits:
                    while index + 1 < len(option) and option[index + 1].isdigit():
                        index += 1
                index += 1
        position += 2 if value_follows else 1
        if last:
            break
    return [place for place in found if place < len(argv)]




def code_reference_problem(command: tuple[str, ...]) -> str | None:
    """Why an exec step's command is refused (a variable other than a built-in inside the code a program
    runs), or None."""
    for program, position in code_arguments(command):
        for match in REFERENCE_PATTERN.finditer(command[position]):
            referenced = match.group(1) or match.group(2)
            if referenced and referenced.lower() not in BUILTIN_NAMES:
                return (f"puts ${referenced} into the code that {program!r} runs (argument {position}), "
                        "where a request's value would become code: use a run step, which passes variables "
                        "as environment variables, or pass the value as an argument of its own")
    return None


#
# Job templates.
#

TEMPLATE_FIELDS = frozenset(
    ("description key key_env api allow_new_variables timeout max_concurrent max_log_bytes variables"
     " steps").split()
)
STEP_FIELDS = frozenset(
    "log run exec name level timeout continue_on_error cwd env stdout_level stderr_level".split()
)
VARIABLE_FIELDS = frozenset("default pattern required choices secret description".split())


@dataclasses.dataclass(frozen=True)
class Variable:
    """A variable a template declares: its default and the rules a request's value must follow."""

    name: str
    default: str = ""
    pattern: re.Pattern | None = None
    required: bool = False
    choices: tuple[str, ...] = ()
    secret: bool = False
    description: str = ""

    def problem(self, value: str) -> str | None:
        """Why a request's value (empty included) breaks the rules, or None; `required` is checked apart."""
        if self.choices and value not in self.choices:
            allowed = "the allowed choices" if self.secret else ", ".join(self.choices)
            return f"Variable {self.name}: the value must be one of {allowed}"
        if self.pattern is not None and not self.pattern.fullmatch(value):
            return f"Variable {self.name}: the value does not match the pattern {self.pattern.pattern}"
        return None


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a template: a log entry, a /bin/sh script, or a program run without a shell."""

    kind: str  # "log", "run" or "exec"
    command: str | tuple[str, ...]
    name: str = ""
    level: str = "INFO"
    timeout: float | None = None
    continue_on_error: bool = False
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    stdout_level: str = "INFO"
    stderr_level: str = "WARN"


@dataclasses.dataclass(frozen=True)
class JobTemplate:
    """A named job definition from templates.toml, as one version of it."""

    name: str
    description: str
    key_digest: str  # SHA-256 of the API key, "" when the template has none
    api: bool
    allow_new_variables: bool
    timeout: float | None
    max_concurrent: int | None
    max_log_bytes: int
    variables: dict[str, Variable]  # by lower-case name
    steps: tuple[Step, ...]
    definition: str  # the TOML table as canonical JSON, without the key: what the store keeps
    version: int = 0  # the store's id for this definition

    @property
    def secret_names(self) -> frozenset[str]:
        """The variables whose values are masked in logs and never kept once the job is final: decided here
        alone, when a job is triggered (the store keeps them apart from the other values)."""
        return frozenset(v.name for v in self.variables.values() if v.secret)


class FieldReader:
    """Reads typed fields out of one TOML table, naming the place in every error."""

    def __init__(self, table, where: str, allowed: frozenset):
        if not isinstance(table, dict):
            raise TemplateError(f"{where}: must be a table")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise TemplateError(f"{where}: unknown field {unknown[0]!r}")
        self.table, self.where = table, where

    def fail(self, field: str, reason: str):
        raise TemplateError(f"{self.where}, {field}: {reason}")

    def get(self, field: str, kinds, default=None, what: str = ""):
        if field not in self.table:
            return default
        value, kinds = self.table[field], kinds if isinstance(kinds, tuple) else (kinds,)
        # TOML true is an int
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.fail(field, f"must be {what}")
        return value

    def text(self, field: str, default=None) -> str | None:
        return self.get(field, str, default, "a string")

    def flag(self, field: str, default: bool) -> bool:
        return self.get(field, bool, default, "true or false")

    def level(self, field: str, default: str) -> str:
        value = self.text(field, default).upper()
        if value not in LEVELS:
            self.fail(field, f"must be one of {', '.join(LEVELS)}")
        return value

    def positive(self, field: str, kinds=(int, float)):
        value = self.get(field, kinds, None, "a positive number")
        if value is not None and not 0 < value < float("inf"):  # also refuses nan
            self.fail(field, "must be a positive number")
        return value


def variable_name_problem(name: str) -> str | None:
    """Why a name cannot be a variable's, or None when it can."""
    if not NAME_PATTERN.fullmatch(name):
        return "is not a valid name (letters, digits and _, not starting with a digit, at most 50 characters)"
    lowered = name.lower()
    if lowered in API_PARAMETERS:
        return "is reserved for the API's own parameter"
    if lowered in BUILTIN_NAMES:
        return "is a built-in variable"
    if lowered in FORBIDDEN_NAMES or lowered.startswith(FORBIDDEN_PREFIXES) \
            or lowered.endswith(FORBIDDEN_SUFFIXES):
        return "is reserved: it would change how programs run"
    return None


def scalar_text(value) -> str | None:
    """A TOML scalar as the text a variable holds (true -> "true"), or None for tables, arrays and dates."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def value_problem(value: str) -> str | None:
    """Why a value cannot be a variable's (from a request, or a default or choice in templates.toml), or None;
    UnicodeEncodeError for text that is not UTF-8."""
    if len(value.encode()) > MAX_VALUE_BYTES:
        return f"is longer than {MAX_VALUE_BYTES // 1024} KiB"
    if "\0" in value:
        return "contains a NUL character"
    return None


def parse_variable(name: str, spec, where: str) -> Variable:
    problem = variable_name_problem(name)
    if problem:
        raise TemplateError(f"{where}: variable name {name!r} {problem}")
    if not isinstance(spec, dict):
        default = scalar_text(spec)
        if default is None:
            raise TemplateError(f"{where}: the default must be a string, number or boolean")
        return Variable(name, default)
    fields = FieldReader(spec, where, VARIABLE_FIELDS)
    default = scalar_text(spec.get("default", ""))
    if default is None:
        fields.fail("default", "must be a string, number or boolean")
    pattern = fields.text("pattern")
    if pattern:
        try:
            pattern = re.compile(pattern)
        except re.error as error:
            fields.fail("pattern", f"is not a valid regular expression: {error}")
    choices = fields.get("choices", list, [], "an array of strings")
    if not all(isinstance(choice, str) for choice in choices):
        fields.fail("choices", "must be an array of strings")
    variable = Variable(
        name, default, pattern or None, fields.flag("required", False), tuple(choices),
        fields.flag("secret", False), fields.text("description", ""),
    )
    # An empty default means "no value": the request must then give one that follows the rules.
    if default and (problem := variable.problem(default)):
        fields.fail("default", f"does not follow its own rules ({problem})")
    return variable


def parse_step(spec, where: str, known_names: set[str] | None) -> Step:
    """One [[name.steps]] table; known_names is None when the template allows undeclared variables."""
    fields = FieldReader(spec, where, STEP_FIELDS)
    kinds = [kind for kind in ("log", "run", "exec") if kind in spec]
    if len(kinds) != 1:
        raise TemplateError(f"{where}: a step needs exactly one of log, run or exec")
    kind = kinds[0]
    if kind == "exec":
        command = spec["exec"]
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            fields.fail("exec", "must be a non-empty array of strings")
        command = tuple(command)
        texts = command
    else:
        command = fields.text(kind)
        texts = (command,) if kind == "log" else ()  # the shell expands run's variables itself
    for text in texts:
        for match in REFERENCE_PATTERN.finditer(text):
            referenced = match.group(1) or match.group(2)
            if referenced and known_names is not None and referenced.lower() not in known_names:
                fields.fail(kind, f"refers to ${referenced}, which is neither declared nor built in")
    if kind == "exec" and (problem := code_reference_problem(command)):
        fields.fail("exec", problem)
    env = fields.get("env", dict, {}, "a table of strings")
    for env_name, env_value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_name) or scalar_text(env_value) is None:
            fields.fail("env", f"{env_name!r} must be a valid name with a string value")
    if "level" in spec and kind != "log":
        fields.fail("level", "applies to log steps only")
    return Step(
        kind, command,
        name=fields.text("name", ""),
        level=fields.level("level", "INFO"),
        timeout=fields.positive("timeout"),
        continue_on_error=fields.flag("continue_on_error", False),
        cwd=fields.text("cwd"),
        env=tuple((k, scalar_text(v)) for k, v in env.items()),
        stdout_level=fields.level("stdout_level", "INFO"),
        stderr_level=fields.level("stderr_level", "WARN"),
    )


def parse_template(name: str, table, where: str) -> JobTemplate:
    """Check one template's table and build it; every problem is a TemplateError naming the field."""
    fields = FieldReader(table, where, TEMPLATE_FIELDS)
    key, key_env = fields.text("key"), fields.text("key_env")
    if key and key_env:
        raise TemplateError(f"{where}: set key or key_env, not both")
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            fields.fail("key_env", f"the environment variable {key_env} is not set")
    variables: dict[str, Variable] = {}
    for variable_name, spec in fields.get("variables", dict, {}, "a table").items():
        variable = parse_variable(variable_name, spec, f"{where}, variables.{variable_name}")
        if variable_name.lower() in variables:
            raise TemplateError(f"{where}, variables.{variable_name}: declared twice (names ignore case)")
        variables[variable_name.lower()] = variable
    allow_new = fields.flag("allow_new_variables", False)
    known = None if allow_new else set(variables) | BUILTIN_NAMES
    step_specs = fields.get("steps", list, [], "an array of tables ([[name.steps]])")
    steps = tuple(parse_step(spec, f"{where}, steps[{i}]", known) for i, spec in enumerate(step_specs))
    max_log_bytes = fields.positive("max_log_bytes", int) or DEFAULT_MAX_LOG_BYTES
    # What the store keeps: never the key, never a secret's default or choices (a job's own variables hold
    # its value; a stored version is only read back to run a job, never to check a request).
    definition = {k: v for k, v in table.items() if k not in ("key", "key_env")}
    if any(v.secret for v in variables.values()):
        definition["variables"] = {
            name: dict(spec, default="", choices=[]) if variables[name.lower()].secret else spec
            for name, spec in table["variables"].items()
        }
    return JobTemplate(
        name=name,
        description=fields.text("description", ""),
        key_digest=key_digest(key) if key else "",
        api=fields.flag("api", True),
        allow_new_variables=allow_new,
        timeout=fields.positive("timeout"),
        max_concurrent=fields.positive("max_concurrent", int),
        max_log_bytes=max_log_bytes,
        variables=variables,
        steps=steps,
        definition=json.dumps(definition, sort_keys=True, default=str),
    )


def load_templates(path: str | Path) -> dict[str, JobTemplate]:
    """Read and check templates.toml; a file with any problem is refused whole."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise TemplateError(f"{path}: cannot read: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TemplateError(f"{path}: invalid TOML: {error}") from None
    templates: dict[str, JobTemplate] = {}
    for name, table in data.items():
        if name.lower() in templates:
            raise TemplateError(f"{path}: template {name!r} is defined twice (names ignore case)")
        templates[name.lower()] = parse_template(name, table, f"{path}: template {name!r}")
        check_values(table, f"{path}: template {name!r}")
    return templates


def check_values(table, where: str) -> None:
    """Defaults and choices in templates.toml follow the limits of a request's value (checked here, not in
    parse_template: a stored version's are never used, its jobs' values having been resolved when
    triggered)."""
    for name, spec in table.get("variables", {}).items():
        if not isinstance(spec, dict):
            if problem := value_problem(scalar_text(spec)):
                raise TemplateError(f"{where}, variables.{name}: the default {problem}")
            continue
        for field, value in [("default", scalar_text(spec.get("default", ""))),
                             *(("choices", choice) for choice in spec.get("choices", []))]:
            if problem := value_problem(value):
                raise TemplateError(f"{where}, variables.{name}, {field}: {problem}")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_problem(given: str | None, digest: str) -> str | None:
    """Why a key does not open a template (or job) with this key digest, or None;
    compared in constant time."""
    if digest and not (hmac.compare_digest(key_digest(given or ""), digest) and given):
        return "Invalid API key" if given else "Missing API key"
    return None


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $Name and ${Name} by the variable's value (names ignore case), $$ by $; unknown names by ""."""

    def value_of(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return "$" if name is None else values.get(name.lower(), "")

    return REFERENCE_PATTERN.sub(value_of, text)


def template_summary(template: JobTemplate) -> dict:
    """What GET /api/templates tells about a template: never its key, never a secret's default."""
    return {
        "name": template.name,
        "description": template.description,
        "key_required": bool(template.key_digest),
        "variables": [
            {
                "name": v.name,
                "default": "" if v.secret else v.default,
                "required": v.required,
                "pattern": v.pattern.pattern if v.pattern else None,
                "choices": [] if v.secret else list(v.choices),
                "secret": v.secret,
                "description": v.description,
            }
            for v in template.variables.values()
        ],
    }


def resolve_variables(template: JobTemplate, given: list[tuple[str, str]]) -> dict[str, str]:
    """The job's variables: the template's defaults overridden by the request, every rule checked (BadValue
    names the variable and the rule, never the value)."""
    if len(given) > MAX_VARIABLES:
        raise BadValue(f"Too many variables: at most {MAX_VARIABLES}")
    values = {v.name: v.default for v in template.variables.values()}
    for raw_name, value in given:
        name = raw_name.removeprefix("$")
        if problem := variable_name_problem(name):
            raise BadValue(f"Variable {shown(name)} {problem}", field=name)
        declared = template.variables.get(name.lower())
        if declared is None:
            if not template.allow_new_variables:
                raise BadValue(f"Variable {name} is not declared by template {template.name}", field=name)
            values[name] = value
        elif problem := declared.problem(value):
            raise BadValue(problem, field=declared.name)
        else:
            values[declared.name] = value
    for variable in template.variables.values():
        if variable.required and not values[variable.name]:
            raise BadValue(f"Variable {variable.name} is required", field=variable.name)
    return values


class TemplateCatalog:
    """The templates in force (reloadable) and every version a job was triggered with."""

    def __init__(self, path: str | Path, store: JobStore):
        self.path, self.store = Path(path), store
        self._current: dict[str, JobTemplate] = {}
        self._names: frozenset[str] = frozenset()
        self._versions: dict[int, JobTemplate] = {}
        self._lock = threading.Lock()
        self._stamp = None
        self.reload()

    def reload(self) -> dict[str, list[str]]:
        """Load the file again; on any problem raise TemplateError (or StoreError) and keep the templates in
        force. Returns the names added, changed and removed."""
        stamp = self._file_stamp()
        templates = load_templates(self.path)
        for name, template in templates.items():
            version = self.store.save_template_version(template.name, template.definition,
                                                       template.key_digest)
            templates[name] = dataclasses.replace(template, version=version)
        with self._lock:
            before = {t.name: t.version for t in self._current.values()}
            self._current = templates
            self._names = frozenset(t.name for t in templates.values())
            self._versions.update((t.version, t) for t in templates.values())
            self._stamp = stamp
        after = {t.name: t.version for t in templates.values()}
        return {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                "changed": sorted(name for name in set(before) & set(after) if before[name] != after[name])}

    def get(self, name: str) -> JobTemplate | None:
        return self._current.get(name.lower())

    def api_templates(self) -> list[JobTemplate]:
        return [t for t in self._current.values() if t.api]

    def names(self) -> frozenset[str]:
        """The names of the templates in force (metrics name no others); asked at every job's trigger and end,
        so made once per load."""
        return self._names

    def version(self, version: int) -> JobTemplate:
        """The template a job was triggered with, from memory or else from the store (a job triggered on
        another instance, or before a restart); TemplateError when it no longer loads."""
        template = self._versions.get(version)
        if template is None:
            name, definition, digest = self.store.template_version(version)
            where = f"stored template {name!r} (version {version})"
            template = parse_template(name, json.loads(definition), where)
            template = dataclasses.replace(template, key_digest=digest, version=version)
            with self._lock:
                self._versions[version] = template
        return template

    def _file_stamp(self):
        try:
            info = self.path.stat()
            return (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            return None

    def reload_if_changed(self, force: bool = False) -> bool:
        """Reload when the file changed since the last load (or when forced, on SIGHUP), logging one event
        either way; returns whether the new templates are in force."""
        if not force and self._file_stamp() == self._stamp:
            return False
        try:
            changes = self.reload()
        except (TemplateError, StoreError) as error:
            self._stamp = self._file_stamp()  # report a bad file once, not every second
            event(logging.WARNING, "templates.refused",
                  "templates not reloaded, the previous ones stay in force",
                  path=str(self.path), reason=str(error))
            return False
        event(logging.INFO, "templates.reloaded", "templates reloaded", path=str(self.path),
              **{what: ",".join(names) for what, names in changes.items() if names},
              templates=len(self._current))
        return True

#
# Job output: what a process prints becomes log entries, cut, masked and sanitized.
#


def sanitize_line(line: str) -> str:
    """A log entry's text with nothing a reader could take for a line break, and no NUL."""
    return UNSAFE_CHARACTERS.sub("\ufffd", line.removesuffix("\r"))


class Masker:
    """Replaces a job's secret values by *** in text and in raw output. Output is logged line by line, so each
    line of a multi-line secret is masked as a secret of its own; longer secrets are replaced first."""

    def __init__(self, values):
        found = {value for value in values if value}
        found |= {line for value in found for line in value.split("\n") if line}
        self.texts = sorted(found, key=len, reverse=True)
        self.raw = [text.encode() for text in self.texts]

    def text(self, text: str) -> str:
        for secret in self.texts:
            text = text.replace(secret, "***")
        return text

    def output(self, raw: bytes) -> bytes:
        for secret in self.raw:
            raw = raw.replace(secret, b"***")
        return raw


class OutputCutter:
    """Cuts one stream of a process's output into log entries: one per line, and a line longer than max_line
    in pieces of at most that much. Feed it chunks as they are read and call end() when the stream closes;
    both return the entries that are complete, raw and unmasked. Each entry is masked on its own afterwards,
    so a cut never falls inside an occurrence of a secret (nor inside a UTF-8 character); see cut_point."""

    def __init__(self, secrets: list[bytes], max_line: int = MAX_LINE_BYTES):
        self.secrets, self.max_line = secrets, max_line
        self.partial = b""  # the unfinished last line, as it came

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, partial = (self.partial + chunk).split(b"\n")
        entries = []
        for line in lines:  # at most twice max_line: the unfinished line never grows past max_line
            line = line.removesuffix(b"\r")  # of a CRLF: not a piece of its own once the line is cut
            while len(line) > self.max_line:
                cut = self.cut_point(line, finished=True)
                entries.append(line[:cut])
                line = line[cut:]
            entries.append(line)
        while len(partial.removesuffix(b"\r")) > self.max_line:  # a \r may be the start of a CRLF
            cut = self.cut_point(partial, finished=False)
            entries.append(partial[:cut])
            partial = partial[cut:]
        self.partial = partial
        return entries

    def end(self) -> list[bytes]:
        rest, self.partial = self.partial, b""
        return [rest] if rest else []

    def cut_point(self, line: bytes, finished: bool) -> int:
        """Where to cut a line longer than max_line: the last place at or before that which is neither inside
        a UTF-8 character, nor inside an occurrence of a secret, nor (in an unfinished line) past the start of
        a secret that may still be arriving at its end. Secrets are at most MAX_VALUE_BYTES, so such a place
        is found in the line's last half unless secrets occur there overlapping one another all along (a
        secret "aa" in "aaaa..."); then max_line."""
        lowest = self.max_line // 2
        highest = self.max_line if finished else min(self.max_line, self.arriving_secret(line))
        if highest <= lowest:
            return self.max_line
        inside = bytearray(highest - lowest + 1)  # 1 where a cut would split an occurrence of a secret
        for secret in (secret for secret in self.secrets if len(secret) > 1):
            start = line.find(secret, max(0, lowest - len(secret) + 1), highest + len(secret) - 1)
            while start != -1:
                first, last = max(start + 1, lowest), min(start + len(secret) - 1, highest)
                inside[first - lowest:last - lowest + 1] = b"\1" * (last - first + 1)
                start = line.find(secret, start + 1, highest + len(secret) - 1)
        for cut in range(highest, lowest, -1):
            # not 10xxxxxx: a character's first byte
            if not inside[cut - lowest] and line[cut] & 0xC0 != 0x80:
                return cut
        return self.max_line

    def arriving_secret(self, line: bytes) -> int:
        """Where the longest end of an unfinished line that begins a secret starts (len(line) if none)."""
        earliest = len(line)
        for secret in self.secrets:
            for size in range(min(len(secret) - 1, len(line)), 0, -1):
                if line.endswith(secret[:size]):
                    earliest = min(earliest, len(line) - size)
                    break
        return earliest

#
# Job store: every SQL statement of the program, one interface over SQLite or PostgreSQL.
#


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """What a status, logs or cancel request needs of a job, read in one statement."""

    id: int
    template: str
    template_version: int
    status: str
    key_digest: str
    log_count: int  # entries logged so far


@dataclasses.dataclass(frozen=True)
class JobDetail(JobRecord):
    """A job as its page shows it. Secret variables are named with the value None: their values are never read
    back for display."""

    variables: dict[str, str | None]
    created_at: float
    started_at: float | None
    finished_at: float | None


class Progress(NamedTuple):
    """Where a job is: its status and how many log entries it has. Both only ever move forward."""

    status: str
    count: int

    def newer(self, other: Progress | None) -> Progress:
        """The later of two readings of the same job (they may arrive out of order)."""
        if other is None:
            return self
        status = self.status if STATUSES.index(self.status) >= STATUSES.index(other.status) else other.status
        return Progress(status, max(self.count, other.count))


class Claim(NamedTuple):
    """A job a worker has claimed: it is Executing, owned by the claiming instance."""

    id: int
    template_version: int
    variables: dict[str, str]  # secrets included
    more: bool = False  # whether newer jobs were Pending too (another worker may look)


def claim_of(row: tuple | None) -> Claim | None:
    """The Claim of a row as CLAIM_UPDATE returns it (id, template version, variables, secrets, more)."""
    if row is None or row[0] is None:
        return None
    variables = json.loads(row[2])
    variables.update(json.loads(row[3]) if row[3] else {})
    return Claim(row[0], row[1], variables, bool(row[4]))


class StoreEvent(NamedTuple):
    """Something that happened to the jobs, from this instance or (PostgreSQL) another one.

    kind is "work" (a job became claimable: triggered, or a slot freed), "job" (a job logged or ended:
    progress says how far), "cancel" (a running job is to stop) or "resync" (events may have been missed:
    re-read everything)."""

    kind: str
    job_id: int = 0
    progress: Progress | None = None


NEXT_FREE_SLOT = """(SELECT min(c.n) FROM (
        SELECT 0 AS n UNION ALL
        SELECT r.slot + 1 FROM jobs r
        WHERE r.template = {row}.template AND r.status = 'Executing' AND r.slot IS NOT NULL
    ) c WHERE NOT EXISTS (
        SELECT 1 FROM jobs u
        WHERE u.template = {row}.template AND u.status = 'Executing' AND u.slot = c.n))"""

# A job takes the lowest free slot of its template below its max_concurrent. A unique index over the slots of
# Executing jobs (schema.sql) makes the database itself refuse a second job in a slot, so two instances that
# claim at once cannot pass the limit: the loser's statement fails and it claims again. A limited template's
# jobs start in trigger order: one whose older sibling is still Pending (perhaps being claimed by another
# instance, which SKIP LOCKED would pass over) is not a candidate.
#
# The candidate is the older of two: the oldest unlimited job, read off a partial index that holds exactly
# those (so it stays one index lookup however long the queue), and the oldest limited job that may start: only
# the oldest Pending job of each limited template can, found in a skip scan of their partial index, one lookup
# per template. In one filtered scan PostgreSQL's planner, which believes few jobs are Pending (true whenever
# its statistics were taken), read every Pending job and sorted them at each claim: 0.6 ms a claim with 1,000
# in the queue.
CLAIM_CANDIDATES = f"""
WITH RECURSIVE limited_template (name) AS (
    SELECT min(template) FROM jobs WHERE status = 'Pending' AND max_concurrent IS NOT NULL
    UNION ALL
    SELECT (SELECT min(o.template) FROM jobs o
            WHERE o.status = 'Pending' AND o.max_concurrent IS NOT NULL AND o.template > t.name)
    FROM limited_template t WHERE t.name IS NOT NULL
),
head AS MATERIALIZED (
    SELECT (SELECT min(o.id) FROM jobs o
            WHERE o.status = 'Pending' AND o.max_concurrent IS NOT NULL AND o.template = t.name) AS id
    FROM limited_template t WHERE t.name IS NOT NULL
),
candidate AS MATERIALIZED (
    SELECT id FROM (
        SELECT p.id FROM jobs p WHERE p.status = 'Pending' AND p.max_concurrent IS NULL
        ORDER BY p.id LIMIT 1 {{skip_locked}}) AS unlimited
    UNION ALL
    SELECT id FROM (
        SELECT p.id FROM jobs p
        -- status || '': checked again on the row as locked, but no index on status to tempt the planner
        -- into reading every Pending job rather than the heads
        WHERE p.id IN (SELECT id FROM head) AND p.status || '' = 'Pending'
          AND {NEXT_FREE_SLOT.format(row='p')} < p.max_concurrent
        ORDER BY p.id LIMIT 1 {{skip_locked}}) AS limited
    ORDER BY id LIMIT 1
)"""
CLAIM_UPDATE = f"""
UPDATE jobs SET status = 'Executing', owner = ?, started_at = {{now}}, cancel_requested = 0,
    slot = CASE WHEN jobs.max_concurrent IS NULL THEN NULL ELSE {NEXT_FREE_SLOT.format(row='jobs')} END
FROM candidate
WHERE jobs.id = candidate.id
  AND EXISTS (SELECT 1 FROM instances i WHERE i.id = ? AND i.lease_until > {{now}})
RETURNING jobs.id, jobs.template_version, jobs.variables, jobs.secrets,
    (SELECT o.id FROM jobs o WHERE o.status = 'Pending' AND o.id > jobs.id ORDER BY o.status, o.id LIMIT 1)
        IS NOT NULL AS more
"""
CLAIM_JOB = CLAIM_CANDIDATES + CLAIM_UPDATE

# A worker's writes about its job hold only while its instance owns the job and holds its lease, so an
# instance that was paused or cut off, and came back after others ended its jobs, changes nothing.
OWNED = ("id = ? AND owner = ? AND status = 'Executing'"
         " AND EXISTS (SELECT 1 FROM instances i WHERE i.id = jobs.owner AND i.lease_until > {now})")


class JobStore:
    """The jobs, their logs, the template versions they were triggered with, and the instances serving them.

    Lookups return None where nothing matches and let the caller decide what that means for HTTP; every
    failure of the database is a StoreError. Writes are transactions (`_write`); every job is committed
    before its token is returned. After each commit the store tells `listener` what happened (StoreEvent),
    and a store that several instances share tells theirs too. Subclasses supply the connection handling
    and the few statements where the SQL dialects differ."""

    exclusive = False  # whether one process at a time has the database (then no other instance can be alive)
    NOW = ""  # the database clock, in seconds since the epoch, as SQL
    SKIP_LOCKED = ""
    LOG_LINE = ""  # an entry as "LEVEL: message\n", as SQL

    origin = ""  # this store's name in the notifications it sends (PostgreSQL)

    def __init__(self):
        self.listener: Callable[[StoreEvent], None] = lambda _event: None
        self.write_failure: str | None = None  # why the last write failed, until one succeeds
        self.failures = 0  # reads and writes that failed, for the metrics
        self.opened = False  # until then a failure is the caller's to tell (app.py: one line, exit 2)
        self._failing_since: float | None = None
        self._told_at = float("-inf")
        self._sql_cache: dict[str, str] = {}

    # What subclasses provide.

    def _read(self) -> contextlib.AbstractContextManager:
        """A connection to read on, as a context manager."""
        raise NotImplementedError

    def _transaction(self) -> contextlib.AbstractContextManager:
        """A connection in a write transaction, committed when the block ends without an error."""
        raise NotImplementedError

    def _commit(self, operation: Callable, events, single: bool) -> tuple:
        """(result, events) of operation(db), committed in a transaction of its own."""
        with self._transaction() as db:
            result = operation(db)
            happened = events(result) if callable(events) else events or []
            if happened:
                self._announce(db, happened)
        return result, happened

    def _announce(self, db, events: list[StoreEvent]) -> None:
        """Tell the other instances about these events, inside the transaction (nothing for SQLite)."""

    def _insert_logs(self, db, job_id: int, first_seq: int, entries: list[tuple[str, str]]) -> None:
        """Insert entries from first_seq on, skipping those already stored: a write whose commit went through
        while its answer was lost (a dropped connection) is sent again with the same entries, and must
        neither fail on them for ever nor store them twice."""
        raise NotImplementedError

    def _prune_turn(self, db) -> bool:
        """Whether this instance may prune now (one instance at a time)."""
        return True

    def _after_prune(self) -> None:
        """Give freed space back, where the database needs to be told."""

    def close(self) -> None:
        raise NotImplementedError

    # Plumbing.

    def _failed(self, reason: str) -> StoreError:
        """Count a failure and tell the operator: when failures start, then at most every 10 s."""
        self.failures += 1
        now = time.monotonic()
        if not self.opened:
            return StoreError(reason)
        if self._failing_since is None:
            self._failing_since = now
        if now - self._told_at >= 10:
            self._told_at = now
            event(logging.ERROR, "store.failed", "the job store failed", reason=reason,
                  failing_for=round(now - self._failing_since, 1))
        return StoreError(reason)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            event(logging.WARNING, "store.recovered", "the job store works again",
                  after=round(time.monotonic() - self._failing_since, 1))
            self._failing_since, self._told_at = None, float("-inf")

    def sql(self, text: str) -> str:
        """A statement in this store's dialect: {now} and {skip_locked} filled in, ? as its placeholder."""
        statement = self._sql_cache.get(text)
        if statement is None:
            statement = self._sql_cache[text] = self._placeholders(
                text.replace("{now}", self.NOW).replace("{skip_locked}", self.SKIP_LOCKED)
                .replace("{log_line}", self.LOG_LINE).replace("{origin}", f"'{self.origin}'"))
        return statement

    @staticmethod
    def _placeholders(statement: str) -> str:
        return statement

    def _run(self, db, statement: str, parameters=()):
        return db.execute(self.sql(statement), parameters)

    def _changed(self, db, statement: str, parameters=()) -> bool:
        """Whether an UPDATE changed a row (read back with RETURNING, alike on both databases)."""
        return self._run(db, statement + " RETURNING 1", parameters).fetchone() is not None

    def _one(self, statement: str, parameters=()):
        with self._read() as db:
            return self._run(db, statement, parameters).fetchone()

    def _all(self, statement: str, parameters=()):
        with self._read() as db:
            return self._run(db, statement, parameters).fetchall()

    def _write(self, operation: Callable, events: Callable | list | None = None, single: bool = False):
        """Run operation(db) in a transaction and return its result once committed. events (a list, or a
        function of the result giving one) are announced to other instances with the commit and given to the
        listener after it. single: the operation is one statement, which commits on its own."""
        try:
            result, happened = self._commit(operation, events, single)
        except SlotTaken:
            raise  # not a failure of the database: the claim is made again
        except StoreError as error:
            self.write_failure = str(error)
            raise
        self.write_failure = None
        if self._failing_since is not None:
            self._recovered()
        for happening in happened:
            try:
                self.listener(happening)
            except Exception:  # a listener's bug must not turn a committed write into a failure
                traceback.print_exc()
        return result

    # Templates and settings.

    def save_template_version(self, name: str, definition: str, digest: str) -> int:
        """The id of this exact definition of a template, stored once."""
        def save(db):
            self._run(db, "INSERT INTO template_versions (name, definition, key_digest, digest)"
                          " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (name, definition, digest, version_digest(name, definition, digest)))
            return self._run(db, "SELECT id FROM template_versions WHERE digest = ?",
                             (version_digest(name, definition, digest),)).fetchone()[0]

        return self._write(save)

    def template_version(self, version: int) -> tuple[str, str, str] | None:
        """(name, definition, key digest) of a stored template version."""
        return self._one("SELECT name, definition, key_digest FROM template_versions WHERE id = ?",
                         (version,))

    def setting(self, name: str, make: Callable[[], str]) -> str:
        """A value every instance shares, made by the first one that asks (the page's signing secret)."""
        def read_or_make(db):
            self._run(db, "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                      (name, make()))
            return self._run(db, "SELECT value FROM settings WHERE name = ?", (name,)).fetchone()[0]

        return self._write(read_or_make)

    # Jobs.

    def insert_job(self, template: JobTemplate, variables: dict[str, str]) -> int:
        """Commit a new Pending job and return its id (its token). Secret values are kept apart, to be
        dropped when the job is final."""
        return self._write(lambda db: self._run(db, self._insert_statement(), self._job_row(template, variables))
                           .fetchone()[0], lambda job_id: [StoreEvent("work", job_id)], single=True)

    def insert_started_job(self, template: JobTemplate, variables: dict[str, str], instance: str
                           ) -> tuple[int, bool]:
        """Commit a new job of an unlimited template, already claimed (Executing) for this instance when no job
        is Pending, else Pending as insert_job does: (its id, whether it was claimed). For an instance with an
        idle worker, this spares the claim's own statement, a round trip to PostgreSQL, when the queue is
        empty: the job starts in trigger order all the same."""
        row = self._job_row(template, variables)[:-1] + (instance, instance)
        job_id, started = self._write(
            lambda db: tuple(self._run(db, self._insert_started_statement(), row).fetchone()[:2]),
            lambda job: [] if job[1] else [StoreEvent("work", job[0])], single=True)
        return job_id, bool(started)

    @staticmethod
    def _job_row(template: JobTemplate, variables: dict[str, str]) -> tuple:
        public = {name: None if name in template.secret_names else value for name, value in variables.items()}
        hidden = {name: value for name, value in variables.items() if name in template.secret_names}
        return (template.version, template.name, json.dumps(public), json.dumps(hidden) if hidden else None,
                template.max_concurrent)

    def _insert_statement(self) -> str:
        return self.INSERT_JOB

    def _insert_started_statement(self) -> str:
        return self.INSERT_STARTED_JOB

    INSERT_JOB = ("INSERT INTO jobs (template_version, template, status, variables, secrets, max_concurrent,"
                  " created_at) VALUES (?, ?, 'Pending', ?, ?, ?, {now}) RETURNING id")
    INSERT_STARTED_JOB = (
        "INSERT INTO jobs (template_version, template, status, variables, secrets, created_at, owner, started_at)"
        " SELECT ?, ?, CASE WHEN c.now THEN 'Executing' ELSE 'Pending' END, ?, ?, {now},"
        " CASE WHEN c.now THEN ? END, CASE WHEN c.now THEN {now} END"
        " FROM (SELECT NOT EXISTS (SELECT 1 FROM jobs p WHERE p.status = 'Pending')"
        " AND EXISTS (SELECT 1 FROM instances i WHERE i.id = ? AND i.lease_until > {now}) AS now) c"
        " RETURNING id, status = 'Executing'")

    def get_job(self, job_id: int) -> JobRecord | None:
        row = self._one(
            "SELECT j.id, j.template, j.template_version, j.status, v.key_digest,"
            " coalesce((SELECT max(seq) + 1 FROM logs WHERE job_id = j.id), 0)"
            " FROM jobs j JOIN template_versions v ON v.id = j.template_version WHERE j.id = ?", (job_id,))
        return JobRecord(*row) if row else None

    def job_detail(self, job_id: int) -> JobDetail | None:
        row = self._one(
            "SELECT j.id, j.template, j.template_version, j.status, v.key_digest,"
            " coalesce((SELECT max(seq) + 1 FROM logs WHERE job_id = j.id), 0),"
            " j.variables, j.created_at, j.started_at, j.finished_at"
            " FROM jobs j JOIN template_versions v ON v.id = j.template_version WHERE j.id = ?", (job_id,))
        if row is None:
            return None
        return JobDetail(*row[:6], json.loads(row[6]), *row[7:])

    def job_status(self, job_id: int) -> str | None:
        row = self._one("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return row[0] if row else None

    def progress_of(self, job_ids: list[int]) -> dict[int, Progress]:
        """The progress of several jobs in one statement (what waits re-read, in case an event was missed)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self._all(f"SELECT id, status,"
                         f" coalesce((SELECT max(seq) + 1 FROM logs WHERE job_id = jobs.id), 0)"
                         f" FROM jobs WHERE id IN ({marks})", job_ids)
        return {job_id: Progress(status, count) for job_id, status, count in rows}

    def list_jobs(self, template: str | None = None, status: str | None = None, before: int | None = None,
                  limit: int = 50) -> list[tuple]:
        """(id, template, status, keyed, created_at, started_at, finished_at) of recent jobs, newest first.
        A filter by status leaves out the jobs of keyed templates, whose status is theirs to see."""
        conditions, parameters = [], []
        if template is not None:
            conditions.append("j.template = ?")
            parameters.append(template)
        if status is not None:
            conditions.append("j.status = ? AND v.key_digest = ''")
            parameters.append(status)
        if before is not None:
            conditions.append("j.id < ?")
            parameters.append(before)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return self._all(
            "SELECT j.id, j.template, j.status, v.key_digest <> '', j.created_at, j.started_at, j.finished_at"
            f" FROM jobs j JOIN template_versions v ON v.id = j.template_version {where}"
            " ORDER BY j.id DESC LIMIT ?", (*parameters, limit))

    def count_jobs(self, status: str) -> int:
        return self._one("SELECT count(*) FROM jobs WHERE status = ?", (status,))[0]

    def claim_job(self, instance: str) -> Claim | None:
        """Take the oldest Pending job whose template has a free slot and mark it Executing for this instance,
        in one statement; None when there is none (or this instance's lease has run out)."""
        def claim(db):
            return self._run(db, CLAIM_JOB, (instance, instance)).fetchone()

        for _attempt in range(20):
            try:
                row = self._write(claim, single=True)  # no event: Executing with no entry is no waiter's news
            except SlotTaken:
                continue  # another instance filled the slot first: claim again
            return claim_of(row)
        return None

    def finish_job_and_claim(self, job_id: int, instance: str, status: str, first_seq: int,
                             entries: list[tuple[str, str]]) -> tuple[bool, Claim | None]:
        """finish_job, then claim_job for the same instance: a worker's end of its job and its claim of the
        next, for a worker that knows more jobs were triggered. PostgreSQL makes them one statement."""
        owned = self.finish_job(job_id, instance, status, first_seq, entries)
        try:
            return owned, self.claim_job(instance)
        except StoreError:
            return owned, None  # the worker looks again, as after any end

    def forget_process_groups(self) -> None:
        """Delete the notes of jobs no longer Executing. The process groups of running steps were noted by
        earlier versions of app.py (this one finds a dead instance's processes by their environment: see
        kill_processes_of); an instance of such a version may still share the database."""
        self._write(lambda db: self._run(
            db, "DELETE FROM process_groups WHERE NOT EXISTS (SELECT 1 FROM jobs j"
                " WHERE j.id = process_groups.job_id AND j.status = 'Executing')"))

    def append_logs(self, job_id: int, instance: str, first_seq: int, entries: list[tuple[str, str]]) -> bool:
        """Store log entries of a job this instance runs; False (nothing stored) when it no longer owns it."""
        entries = list(entries)  # the caller's buffer goes on growing
        return self._write(lambda db: self._append(db, job_id, instance, first_seq, entries),
                           lambda owned: [StoreEvent("job", job_id, Progress(EXECUTING, first_seq + len(entries)))]
                           if owned else [], single=self.JOB_WRITES_ARE_ONE_STATEMENT)

    # Whether _append and _finish are one statement each, committed on its own: then no transaction of a job's
    # worker stays open while an answer travels, holding the job's row from others (if this instance is paused
    # just then, from the instance that would end its jobs).
    JOB_WRITES_ARE_ONE_STATEMENT = False

    def _append(self, db, job_id: int, instance: str, first_seq: int, entries) -> bool:
        """The entries, if this instance owns the job; whether it does."""
        owned = self._run(db, "SELECT 1 FROM jobs WHERE " + OWNED, (job_id, instance)).fetchone()
        if owned:
            self._insert_logs(db, job_id, first_seq, entries)
        return bool(owned)

    def finish_job(self, job_id: int, instance: str, status: str, first_seq: int,
                   entries: list[tuple[str, str]]) -> bool:
        """Store the last entries and the final status of a job this instance runs, forgetting its secret
        values and freeing its slot; False (nothing stored) when it no longer owns the job."""
        entries = list(entries)
        return self._write(lambda db: self._finish(db, job_id, instance, status, first_seq, entries),
                           lambda row: self._finish_events(job_id, status, first_seq + len(entries), row),
                           single=self.JOB_WRITES_ARE_ONE_STATEMENT) is not None

    @staticmethod
    def _finish_events(job_id: int, status: str, count: int, row: tuple | None) -> list[StoreEvent]:
        """What a job's end tells: nothing when this instance no longer owned it (row None), else the job's
        progress, and "work" when it freed a slot (row[0]): more may run."""
        if row is None:
            return []
        ended = StoreEvent("job", job_id, Progress(status, count))
        return [ended, StoreEvent("work")] if row[0] is not None else [ended]

    def _finish(self, db, job_id: int, instance: str, status: str, first_seq: int, entries) -> tuple | None:
        """The final status and the last entries, if this instance owns the job; (its slot,) or None."""
        row = self._run(db, "UPDATE jobs SET status = ?, finished_at = {now}, secrets = NULL"
                            " WHERE " + OWNED + " RETURNING slot", (status, job_id, instance)).fetchone()
        if row is not None:
            self._insert_logs(db, job_id, first_seq, entries)
        return row

    def cancel_job(self, job_id: int) -> str | None:
        """Cancel a job: a Pending one ends in Error at once ("canceled"); an Executing one is marked for its
        instance to stop ("requested"); a final one is left as it was (its status). None: no such job."""
        def cancel(db):
            if self._changed(db, "UPDATE jobs SET status = 'Error', finished_at = {now}, secrets = NULL"
                                 " WHERE id = ? AND status = 'Pending'", (job_id,)):
                self._insert_logs(db, job_id, 0, [("ERROR", "Job canceled")])
                return "canceled"
            if self._changed(db, "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'Executing'",
                             (job_id,)):
                return "requested"
            row = self._run(db, "SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return row[0] if row else None

        def events(outcome):
            if outcome == "canceled":
                return [StoreEvent("job", job_id, Progress(ERROR, 1))]
            return [StoreEvent("cancel", job_id)] if outcome == "requested" else []

        return self._write(cancel, events)

    def owned_jobs(self, instance: str, older_than: float) -> list[int]:
        """The Executing jobs this instance claimed more than older_than seconds ago."""
        return [row[0] for row in self._all(
            "SELECT id FROM jobs WHERE owner = ? AND status = 'Executing' AND started_at < {now} - ?",
            (instance, older_than))]

    def cancel_requests(self, instance: str) -> list[int]:
        """The jobs this instance runs that someone asked to cancel."""
        return [row[0] for row in self._all(
            "SELECT id FROM jobs WHERE owner = ? AND status = 'Executing' AND cancel_requested = 1",
            (instance,))]

    def read_logs(self, job_id: int, offset: int, count: int, chunk_rows: int = 5000) -> str | Iterator[str]:
        """The entries from `offset` up to `count` as "LEVEL: message\\n" text.

        Entries never change once written, so a count read with the job's status bounds a consistent answer
        without a transaction. A log that fits in one chunk comes back as one string (so the response has a
        length and the connection stays open); a longer one as chunks, each read as it is sent, never all at
        once, and each on a connection borrowed just for it."""
        if offset >= count:
            return ""

        def chunk(start: int) -> str:
            rows = self._all("SELECT {log_line} FROM logs WHERE job_id = ? AND seq >= ? AND seq < ?"
                             " ORDER BY seq",
                             (job_id, start, min(start + chunk_rows, count)))
            return "".join(row[0] for row in rows)

        if count - offset <= chunk_rows:
            return chunk(offset)
        return (chunk(start) for start in range(offset, count, chunk_rows))

    def log_tail(self, job_id: int, first: int, last: int) -> list[tuple[int, str, str]]:
        """(seq, level, message) of the entries from first up to last (the page shows a log's end)."""
        return self._all("SELECT seq, level, message FROM logs WHERE job_id = ? AND seq >= ? AND seq < ?"
                         " ORDER BY seq", (job_id, first, last))

    # Instances and their leases.

    def register_instance(self, instance: str, lease: float) -> None:
        """A new instance and its first lease. On a database only one process can have, every other instance
        is dead, so their leases end now and their jobs are ended at once."""
        def register(db):
            if self.exclusive:
                self._run(db, "UPDATE instances SET lease_until = 0 WHERE lease_until > 0")
            self._run(db, "INSERT INTO instances (id, host, boot_id, pid, started_at, lease_until)"
                          " VALUES (?, ?, ?, ?, {now}, {now} + ?)",
                      (instance, socket.gethostname(), boot_id(), os.getpid(), lease))

        self._write(register)

    def renew_lease(self, instance: str, lease: float) -> bool:
        """Extend this instance's lease, by the database's clock; False when it had already run out (others
        may be ending its jobs: it must start again as a new instance)."""
        return self._write(lambda db: self._changed(db, self.RENEW_LEASE, (lease, instance)), single=True)

    RENEW_LEASE = "UPDATE instances SET lease_until = {now} + ? WHERE id = ? AND lease_until > {now}"

    def end_lease(self, instance: str) -> None:
        """This instance stops: its lease ends now (its jobs are already final)."""
        self._write(lambda db: self._run(db, "UPDATE instances SET lease_until = 0 WHERE id = ?",
                                         (instance,)))

    def orphaned_jobs(self) -> list[tuple[int, str | None, int | None, str | None]]:
        """(id, owner, process group noted by an earlier app.py, owner's boot id) of the Executing jobs
        whose instance's lease ran out."""
        return self._all(
            "SELECT j.id, j.owner, coalesce(g.process_group, j.process_group), i.boot_id FROM jobs j"
            " LEFT JOIN instances i ON i.id = j.owner LEFT JOIN process_groups g ON g.job_id = j.id"
            " WHERE j.status = 'Executing' AND (i.id IS NULL OR i.lease_until <= {now}) ORDER BY j.id")

    def end_orphaned_job(self, job_id: int, owner: str | None, message: str) -> tuple[str, float] | None:
        """End in Error a job whose instance stopped, with an entry saying so; (its template, how long it ran)
        or None when it was already final (or claimed by its owner's successor)."""
        def end(db):
            ended = self._run(db, "UPDATE jobs SET status = 'Error', finished_at = {now}, secrets = NULL"
                                  " WHERE id = ? AND status = 'Executing'"
                                  " AND coalesce(owner, '') = coalesce(?, '')"
                                  " RETURNING template, {now} - coalesce(started_at, created_at)",
                              (job_id, owner)).fetchone()
            if ended is None:
                return None
            seq = self._run(db, "SELECT coalesce(max(seq) + 1, 0) FROM logs WHERE job_id = ?",
                            (job_id,)).fetchone()[0]
            self._insert_logs(db, job_id, seq, [("ERROR", message)])
            return seq + 1, (ended[0], float(ended[1]))

        result = self._write(end, lambda ended: [StoreEvent("job", job_id, Progress(ERROR, ended[0])),
                                                 StoreEvent("work")] if ended else [])
        return result[1] if result else None

    def forget_instances(self, older_than: float) -> None:
        """Delete instances whose lease ended long ago and who own no Executing job."""
        self._write(lambda db: self._run(
            db, "DELETE FROM instances WHERE lease_until < {now} - ? AND NOT EXISTS"
                " (SELECT 1 FROM jobs WHERE owner = instances.id AND status = 'Executing')", (older_than,)))

    # Upkeep.

    def health_problem(self) -> str | None:
        """Why the store is not well (it does not answer a read, or its last write failed), or None. No
        writes: a load balancer may ask often."""
        try:
            self._probe()
        except StoreError as error:
            return f"the job store cannot be read: {error}"
        if self.write_failure:
            return f"the job store cannot be written: {self.write_failure}"
        return None

    def _probe(self) -> None:
        """The smallest read, which the health check asks for."""
        self._one("SELECT 1 FROM instances LIMIT 1")

    def prune_finished(self, older_than_days: float, stopping: threading.Event | None = None,
                       batch: int = 500) -> int:
        """Delete finished jobs older than that, with their logs, in small transactions, on one instance at a
        time. Returns the number of jobs deleted."""
        age = older_than_days * 86400

        def prune_some(db) -> int:
            if not self._prune_turn(db):
                return 0
            ids = [row[0] for row in self._run(
                db, "SELECT id FROM jobs WHERE finished_at < {now} - ?"
                    " ORDER BY finished_at LIMIT ?", (age, batch))]
            if ids:
                marks = ",".join("?" * len(ids))
                self._run(db, f"DELETE FROM logs WHERE job_id IN ({marks})", ids)
                self._run(db, f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            return len(ids)

        deleted = 0
        while (stopping is None or not stopping.is_set()) and (count := self._write(prune_some)):
            deleted += count
        if deleted:
            self._after_prune()
        return deleted


class SlotTaken(StoreError):
    """Two instances claimed a job into the same slot at once; the one refused claims again."""


def version_digest(name: str, definition: str, key: str) -> str:
    return hashlib.sha256(json.dumps([name, definition, key]).encode()).hexdigest()


def boot_id() -> str:
    """This boot of this machine: two instances with the same boot id can signal each other's processes."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


SCHEMA_VERSION = 2  # 1: before instances, leases and slots (the first released schema)


class SQLiteStore(JobStore):
    """The jobs in one SQLite file, for one server process (app.py holds a lock on the file).

    Writes go through one connection, one transaction at a time (BEGIN IMMEDIATE, so a lock held by another
    program is met at the start of a write, within the busy timeout). Reads use a small shelf of connections
    of their own: in WAL mode they never wait for writes."""

    exclusive = True
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    LOG_LINE = "level || ': ' || message || char(10)"
    IDLE_READERS = 8

    def __init__(self, path: str | Path, busy_timeout: float = DEFAULTS.busy_timeout):
        super().__init__()
        if sqlite3.sqlite_version_info < (3, 35):
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: 3.35 or newer is needed")
        self.path, self.busy_timeout = str(path), busy_timeout
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        with self._errors():
            self._writer = self._connect(writer=True)
            try:
                self._create_schema()
            except BaseException:
                self._writer.close()
                raise
        self._group = GroupCommit(self._writer)
        self.opened = True

    def _connect(self, writer: bool = False) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                     check_same_thread=False)
        if writer:  # on a new file this must come first: switching to WAL writes the header
            connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a crash of this process
        return connection

    def _create_schema(self) -> None:
        db = self._writer
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if "jobs" in tables and version < 2:
            migrate_sqlite_from_1(db)
        elif version > SCHEMA_VERSION:
            raise StoreError(f"the database has schema version {version}, newer than this app.py knows "
                             f"({SCHEMA_VERSION})")
        db.executescript(SCHEMA_PATH.read_text())
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.IntegrityError as error:
            if "slot" in str(error):
                raise SlotTaken(str(error)) from None
            raise self._failed(str(error)) from None
        except sqlite3.Error as error:
            raise self._failed(str(error)) from None

    @contextlib.contextmanager
    def _read(self):
        with self._readers_lock:
            connection = self._readers.pop() if self._readers else None
        with self._errors():
            if self._closed:
                raise sqlite3.OperationalError("the job store is closed: the server is stopping")
            if connection is None:
                connection = self._connect()
            try:
                yield connection
            finally:
                with self._readers_lock:
                    keep = len(self._readers) < self.IDLE_READERS and not self._closed
                    if keep:
                        self._readers.append(connection)
                if not keep:
                    connection.close()

    def _commit(self, operation: Callable, events, single: bool) -> tuple:
        with self._errors():
            result = self._group.run(operation)
        return result, events(result) if callable(events) else events or []

    def health_problem(self) -> str | None:
        """Also whether another program holds the database's write lock: taking the lock and letting it go
        writes nothing, on a connection of its own that waits no more than a moment."""
        problem = super().health_problem()
        if problem is None:
            try:
                probe = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
                try:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.execute("ROLLBACK")
                finally:
                    probe.close()
            except sqlite3.Error as error:
                return f"the job store cannot be written: {error}"
        return problem

    def _insert_logs(self, db, job_id: int, first_seq: int, entries: list[tuple[str, str]]) -> None:
        db.executemany("INSERT INTO logs (job_id, seq, level, message) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT (job_id, seq) DO NOTHING",  # see JobStore._insert_logs
                       ((job_id, first_seq + i, level, message)
                        for i, (level, message) in enumerate(entries)))

    def _after_prune(self) -> None:
        self._write(lambda db: db.execute("PRAGMA incremental_vacuum").fetchall())

    def close(self) -> None:
        self._closed = True
        self._group.close()
        self._writer.close()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for connection in readers:
            connection.close()


class QueuedWrite:
    """A write waiting for the next transaction, and then its outcome."""

    __slots__ = ("operation", "done", "turn", "finished", "result", "error")

    def __init__(self, operation: Callable):
        self.operation = operation
        # held until the write is committed (or failed), or it is this one's turn
        self.done = threading.Lock()
        self.done.acquire()
        self.turn = self.finished = False
        self.result = self.error = None


class GroupCommit:
    """The SQLite store's writes, committed together on its one connection.

    Every SQLite call gives up the interpreter lock, and under load getting it back takes a while: with one
    transaction per write, a write held the store's lock for milliseconds while requests queued behind it. So
    a thread queues its write; when no commit is under way it commits, in one transaction, every write queued
    by then, else it sleeps on a lock of its write's own until a committer has done its write. Once its own
    write is done, a committer wakes the writers of its batch and hands the turn to the oldest writer still
    queued. A write that fails on its own (not the database: a lock, a full disk) is taken out and the others
    are committed again, each alone."""

    MAX_BATCH = 500

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.queue: deque[QueuedWrite] = deque()
        self.mutex = threading.Lock()  # guards the queue and the flags; never held during a commit
        self.idle = threading.Condition(self.mutex)
        self.committing = self.closed = False

    def run(self, operation: Callable):
        """operation(db)'s result, once committed; raises what it raised, or what failed the transaction."""
        write = QueuedWrite(operation)
        with self.mutex:
            if self.closed:
                raise sqlite3.OperationalError("the job store is closed: the server is stopping")
            self.queue.append(write)
            waiting, self.committing = self.committing, True
        if waiting:
            write.done.acquire()  # until a committer has done it, or hands this thread the turn
        if not write.finished:
            self._take_turn(write)
        if write.error is not None:
            raise write.error
        return write.result

    def _take_turn(self, own: QueuedWrite) -> None:
        """Commit batches from the front of the queue until `own` is done, then hand the turn on."""
        try:
            while not own.finished:
                with self.mutex:
                    batch = [self.queue.popleft() for _ in range(min(len(self.queue), self.MAX_BATCH))]
                try:
                    self._commit(batch)
                finally:
                    for write in batch:
                        if write is not own:
                            write.done.release()
        finally:
            with self.mutex:
                if self.queue:
                    self.queue[0].turn = True
                    self.queue[0].done.release()
                else:
                    self.committing = False
                    self.idle.notify_all()

    def _commit(self, batch: list[QueuedWrite]) -> None:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            for write in batch:
                write.result = write.operation(db)
            db.execute("COMMIT")
        except BaseException as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            alone = isinstance(error, Exception) and not isinstance(error, sqlite3.OperationalError)
            if alone and len(batch) > 1:
                for write in batch:  # one write's own error: each again, alone
                    write.result = None
                    self._commit([write])
                return
            for write in batch:  # the database failed (or an interrupt came): every write of the batch fails
                write.result, write.finished = None, True
                write.error = error if isinstance(error, Exception) else sqlite3.OperationalError(
                    "the write was interrupted")
            if not isinstance(error, Exception):
                raise
            return
        for write in batch:
            write.finished = True

    def close(self) -> None:
        """Refuse new writes, once the commit under way is done."""
        with self.mutex:
            self.closed = True
            while self.committing:
                self.idle.wait()


def migrate_sqlite_from_1(db: sqlite3.Connection) -> None:
    """Bring a database of the first schema up to this one: the columns that instances, slots and kept-apart
    secrets need, and the secret values of unfinished jobs moved out of their variables."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for column in ("secrets TEXT", "max_concurrent INTEGER", "owner TEXT", "slot INTEGER",
                       "cancel_requested INTEGER NOT NULL DEFAULT 0"):
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
        db.execute("ALTER TABLE template_versions ADD COLUMN digest TEXT")
        for version, name, definition, key in db.execute(
                "SELECT id, name, definition, key_digest FROM template_versions").fetchall():
            db.execute("UPDATE template_versions SET digest = ? WHERE id = ?",
                       (version_digest(name, definition, key), version))
        rows = db.execute("SELECT j.id, j.status, j.variables, v.definition FROM jobs j"
                          " JOIN template_versions v ON v.id = j.template_version").fetchall()
        for job_id, status, variables, definition in rows:
            spec = json.loads(definition)
            limit = spec.get("max_concurrent")
            declared = spec.get("variables", {})
            secret = {name for name, field in declared.items()
                      if isinstance(field, dict) and field.get("secret")}
            values = json.loads(variables)
            hidden = {name: values[name] for name in secret
                      if name in values and status not in FINAL_STATUSES}
            values.update((name, None) for name in secret)
            db.execute("UPDATE jobs SET variables = ?, secrets = ?, max_concurrent = ? WHERE id = ?",
                       (json.dumps(values), json.dumps(hidden) if hidden else None,
                        limit if isinstance(limit, int) else None, job_id))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class PostgresStore(JobStore):
    """The jobs in a PostgreSQL database that any number of instances share.

    Connections come from a pool (psycopg_pool); a connection of its own LISTENs for what other instances
    announce (NOTIFY). A notification is only a hint: the runner and the waits also re-read on a short
    interval and after every reconnect, so a lost one delays an answer by that interval at most."""

    NOW = "extract(epoch from now())"
    SKIP_LOCKED = "FOR UPDATE OF p SKIP LOCKED"
    LOG_LINE = "level || ': ' || message || chr(10)"
    CHANNEL = "jobserver"
    PRUNE_LOCK = 7_406_193_101  # the advisory lock that lets one instance at a time prune

    def __init__(self, url: str, busy_timeout: float = DEFAULTS.busy_timeout,
                 connections: int = DEFAULTS.db_connections, lease: float = DEFAULTS.lease):
        super().__init__()
        import psycopg  # only when a PostgreSQL URL is given: SQLite needs nothing installed

        self.psycopg, self.url, self.busy_timeout = psycopg, url, busy_timeout
        self.origin = uuid.uuid4().hex[:12]  # this store's own notifications are not news to it
        self._stopping = threading.Event()
        self._probe_lock, self._probing = threading.Lock(), None
        self.others_alive = True  # until the first renewal says (see RENEW_LEASE_COUNTING)
        # A transaction left open by an instance that stopped half-way (paused, or cut off) would hold its rows
        # from the instance that ends its jobs: PostgreSQL ends such a session after a quarter of the lease.
        self.idle_transaction_ms = max(1000, int(lease * 250))
        self.pool = recent_first_pool_class()(
            url, min_size=min(2, connections), max_size=connections, open=False, timeout=busy_timeout,
            kwargs={"autocommit": True}, name="jobserver", check=self._check_if_idle, configure=self._configure)
        with self._errors():
            self._first_connection()
            self.pool.open(wait=True, timeout=busy_timeout)
            self._create_schema()
        self.opened = True
        self._listening = threading.Thread(target=self._listen, name="pg-listen", daemon=True)
        self._listening.start()

    IDLE_CHECK_SECONDS = 1.0

    @contextlib.contextmanager
    def _lend(self, timeout: float | None = None):
        """A connection of the pool, marked with when it was last used (see _check_if_idle)."""
        with self.pool.connection(timeout=timeout) as db:
            try:
                yield db
            finally:
                db.returned_at = time.monotonic()

    QUICK_SECONDS = 1.0  # what the lease and the health check wait for a pooled connection

    def renew_lease(self, instance: str, lease: float) -> bool:
        """On a pooled connection if one comes within a second, else on a connection of its own: after an
        outage the pool reconnects on a back-off that doubles (1, 2, 4, 8 s...), and the lease must not wait
        for it, or a short outage would stop the jobs. Also learns whether other instances are alive."""
        try:
            with self._errors(), self._lend(timeout=self.QUICK_SECONDS) as db:
                return self._renew(db, instance, lease)
        except StoreError:
            with self._errors(), self.psycopg.connect(self.url, autocommit=True, connect_timeout=2,
                                                      application_name="jobserver-lease") as db:
                return self._renew(db, instance, lease)

    def register_instance(self, instance: str, lease: float) -> None:
        super().register_instance(instance, lease)
        self.renew_lease(instance, lease)  # learns now, not at the first renewal, whether others are alive

    # A lone instance does not announce work: NOTIFY takes a lock at every commit and wakes this instance's own
    # listener, for nobody. A new instance is announced to within a renewal (lease/10), and looks for work
    # every second meanwhile.
    RENEW_LEASE_COUNTING = (JobStore.RENEW_LEASE + " RETURNING (SELECT count(*) FROM instances o"
                            " WHERE o.id <> instances.id AND o.lease_until > {now})")

    def _renew(self, db, instance: str, lease: float) -> bool:
        row = self._run(db, self.RENEW_LEASE_COUNTING, (lease, instance)).fetchone()
        if row is not None:
            self.others_alive = row[0] > 0
        return row is not None

    def _probe(self) -> None:
        # Within a second, not --busy-timeout: a load balancer's health check gives up after a few. A server
        # that hangs rather than refuses must not hang the check with it, so the read runs on a thread of
        # its own, one at a time, and the check waits only so long for it.
        with self._probe_lock:
            if self._probing is None or self._probing.done.is_set():
                self._probing = BackgroundCall(self._probe_read, "pg-health")
            probing = self._probing
        if not probing.done.wait(self.QUICK_SECONDS + 0.5):
            raise self._failed(f"PostgreSQL does not answer (no answer to a read within"
                               f" {self.QUICK_SECONDS + 0.5:g} s)")
        if probing.error is not None:
            raise probing.error

    def _probe_read(self) -> None:
        with self._errors(), self._lend(timeout=self.QUICK_SECONDS) as db:
            db.execute("SELECT 1 FROM instances LIMIT 1")

    def _configure(self, db) -> None:
        db.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                   (str(self.idle_transaction_ms),))

    def _check_if_idle(self, db) -> None:
        """Before a connection is lent: one that sat idle for a while may have lost its server (a restart), so
        it is tried first with an empty query (the pool replaces it if that fails); one just returned is not,
        which saves a round trip per statement under load."""
        if time.monotonic() - getattr(db, "returned_at", 0.0) > self.IDLE_CHECK_SECONDS:
            self.pool.check_connection(db)

    def _first_connection(self) -> None:
        """Connect once before the pool does, so that a wrong URL or password is told at once and clearly."""
        self.psycopg.connect(self.url, connect_timeout=max(1, int(self.busy_timeout))).close()

    def _create_schema(self) -> None:
        with self.pool.connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(7406193100)")  # instances starting at once take turns
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"the database has schema version {version}, newer than this app.py knows "
                                 f"({SCHEMA_VERSION})")
            db.execute(POSTGRES_SCHEMA_PATH.read_text())
            if version is None:
                db.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))

    @staticmethod
    def _placeholders(statement: str) -> str:
        return statement.replace("%", "%%").replace("?", "%s")

    @contextlib.contextmanager
    def _errors(self):
        from psycopg_pool import PoolTimeout

        try:
            yield
        except self.psycopg.errors.UniqueViolation as error:
            if "slot" in str(error):
                raise SlotTaken(str(error).splitlines()[0]) from None
            raise self._failed(str(error).splitlines()[0]) from None
        except PoolTimeout as error:  # "couldn't get a connection after 5.00 sec" (an OperationalError too)
            raise self._failed(f"PostgreSQL does not answer ({error})") from None
        except self.psycopg.Error as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise self._failed(scrubbed(reason, self.url)) from None

    @contextlib.contextmanager
    def _read(self):
        with self._errors(), self._lend() as db:
            yield db

    @contextlib.contextmanager
    def _transaction(self):
        # Not in pipeline mode, which would spare round trips: there a read sends no Sync, so PostgreSQL does not
        # count the session idle in its transaction, and an instance paused in one would hold its rows for as
        # long as it is paused (see idle_transaction_ms). What runs often is one statement (see _commit).
        with self._errors(), self._lend() as db, db.transaction():
            yield db

    def _commit(self, operation: Callable, events, single: bool) -> tuple:
        if not single:
            return super()._commit(operation, events, single)
        # One statement commits on its own: no BEGIN, no COMMIT,
        # and the other instances hear of it just after.
        with self._errors(), self._lend() as db:
            result = operation(db)
            happened = events(result) if callable(events) else events or []
            if happened:
                self._announce(db, happened)
        return result, happened

    def _announce(self, db, events: list[StoreEvent]) -> None:
        # Only what sets another instance to work (a job to claim, a cancel): a waiter on another instance
        # learns of a job's progress by its half-second re-read, which spares every log flush and every end
        # a NOTIFY, and the commit lock that NOTIFY takes.
        events = [happening for happening in events if happening.kind == "cancel"
                  or (happening.kind == "work" and not happening.job_id  # a new job's went with its INSERT
                      and self.others_alive)]
        if not events:
            return
        payloads = []
        for happening in events:
            progress = happening.progress
            payloads.append(f"{happening.kind} {happening.job_id} {progress.status if progress else '-'}"
                            f" {progress.count if progress else 0} {self.origin}")
        db.execute("SELECT " + ", ".join(["pg_notify(%s, %s)"] * len(payloads)),
                   [value for payload in payloads for value in (self.CHANNEL, payload)])

    def _insert_logs(self, db, job_id: int, first_seq: int, entries: list[tuple[str, str]]) -> None:
        if entries:  # one statement for the whole batch, its columns as arrays
            self._run(db, self.ENTRIES + " ON CONFLICT (job_id, seq) DO NOTHING",  # see JobStore._insert_logs
                      self._entry_values(job_id, first_seq, entries))

    JOB_WRITES_ARE_ONE_STATEMENT = True
    # The new job's NOTIFY goes with its INSERT: a trigger is one round trip (see _announce).
    INSERT_JOB = ("WITH job AS (" + JobStore.INSERT_JOB + ")"
                  " SELECT id, pg_notify('jobserver', 'work ' || id || ' - 0 ' || {origin}) FROM job")

    INSERT_STARTED_JOB = ("WITH job AS (" + JobStore.INSERT_STARTED_JOB + " AS started)"
                          " SELECT id, started, CASE WHEN NOT started THEN"
                          " pg_notify('jobserver', 'work ' || id || ' - 0 ' || {origin}) END FROM job")

    def _insert_statement(self) -> str:
        return self.INSERT_JOB if self.others_alive else JobStore.INSERT_JOB

    def _insert_started_statement(self) -> str:
        return self.INSERT_STARTED_JOB if self.others_alive else JobStore.INSERT_STARTED_JOB

    # A write's entries, their columns as arrays; its parameters come from _entry_values. GUARDED_ENTRIES stores
    # them only if the statement's CTE {guard} has a row (see JobStore._insert_logs for ON CONFLICT).
    ENTRIES = ("INSERT INTO logs (job_id, seq, level, message)"
               " SELECT ?, ?::integer + n - 1, level, message"
               " FROM unnest(?::text[], ?::text[]) WITH ORDINALITY AS e(level, message, n)")
    GUARDED_ENTRIES = ENTRIES + " WHERE EXISTS (SELECT 1 FROM {guard}) ON CONFLICT (job_id, seq) DO NOTHING"
    # A job's end: its final status if this instance owns it (`done`, with its slot), and its last entries.
    # Parameters: status, job id, instance, then _entry_values.
    FINISH = ("done AS (UPDATE jobs SET status = ?, finished_at = {now}, secrets = NULL"
              " WHERE " + OWNED + " RETURNING slot),"
              " entry AS (" + GUARDED_ENTRIES.format(guard="done") + ")")

    @staticmethod
    def _entry_values(job_id: int, first_seq: int, entries) -> tuple:
        return job_id, first_seq, [level for level, _ in entries], [message for _, message in entries]

    def _append(self, db, job_id: int, instance: str, first_seq: int, entries) -> bool:
        # One statement: the entries go in only if the job is this instance's, its row held (FOR SHARE) so that
        # no other instance ends it meanwhile.
        return self._run(db, "WITH owned AS (SELECT 1 FROM jobs WHERE " + OWNED + " FOR SHARE),"
                             " entry AS (" + self.GUARDED_ENTRIES.format(guard="owned") + ")"
                             " SELECT EXISTS (SELECT 1 FROM owned)",
                         (job_id, instance, *self._entry_values(job_id, first_seq, entries))).fetchone()[0]

    def _finish(self, db, job_id: int, instance: str, status: str, first_seq: int, entries) -> tuple | None:
        # One statement: the entries go in only if the UPDATE found the job this instance's.
        return self._run(db, "WITH " + self.FINISH + " SELECT slot FROM done",
                         (status, job_id, instance, *self._entry_values(job_id, first_seq, entries))).fetchone()

    # A worker's end of its job and its claim of the next, one statement: one round trip and one commit fewer
    # a job under load. Both UPDATEs see one snapshot, in which a slot the end frees is not yet free: the runner
    # uses it at the end of an unlimited template's job only.
    FINISH_AND_CLAIM = (CLAIM_CANDIDATES + ", claimed AS (" + CLAIM_UPDATE + "), " + FINISH +
                        " SELECT EXISTS (SELECT 1 FROM done), (SELECT slot FROM done), c.id, c.template_version,"
                        " c.variables, c.secrets, c.more FROM (SELECT 1) AS one LEFT JOIN claimed c ON true")

    def finish_job_and_claim(self, job_id: int, instance: str, status: str, first_seq: int,
                             entries: list[tuple[str, str]]) -> tuple[bool, Claim | None]:
        entries = list(entries)

        def finish_and_claim(db):
            claim = (instance, instance)
            end = (status, job_id, instance, *self._entry_values(job_id, first_seq, entries))
            return self._run(db, self.FINISH_AND_CLAIM, claim + end).fetchone()

        try:
            row = self._write(finish_and_claim, lambda row: self._finish_events(
                job_id, status, first_seq + len(entries), row[1:2] if row[0] else None), single=True)
        except SlotTaken:  # another instance took the slot the claim chose: nothing was written
            return super().finish_job_and_claim(job_id, instance, status, first_seq, entries)
        return row[0], claim_of(row[2:])

    def _prune_turn(self, db) -> bool:
        return db.execute("SELECT pg_try_advisory_xact_lock(%s)", (self.PRUNE_LOCK,)).fetchone()[0]

    def _listen(self) -> None:
        """Pass other instances' events to the listener; after a lost connection, reconnect and resync."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                with self.psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                          application_name="jobserver-listen") as db:
                    db.execute(f"LISTEN {self.CHANNEL}")
                    self.listener(StoreEvent("resync"))
                    delay = 0.5
                    while not self._stopping.is_set():
                        for notification in db.notifies(timeout=1.0):
                            if self._stopping.is_set():
                                break
                            self._heard(notification.payload)
                        db.execute("SELECT 1")  # a dead connection shows here, not only when a NOTIFY comes
            except self.psycopg.Error:
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 5.0)
            except Exception:
                traceback.print_exc()
                self._stopping.wait(delay)

    def _heard(self, payload: str) -> None:
        try:
            kind, job_id, status, count, origin = payload.split(" ")
        except ValueError:
            return
        if origin == self.origin:
            return
        progress = Progress(status, int(count)) if status in STATUSES else None
        self.listener(StoreEvent(kind, int(job_id), progress))

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(Exception):  # wakes the listener now rather than at its next timeout
            with self.pool.connection(timeout=1) as db:
                db.execute("SELECT pg_notify(%s, %s)", (self.CHANNEL, f"stop 0 - 0 {self.origin}"))
        self._listening.join(timeout=5)
        self.pool.close()


def recent_first_pool_class():
    """psycopg_pool's pool, lending the connection returned last rather than the one returned longest ago.

    On this project's VM, a PostgreSQL backend that has slept for a few milliseconds answers a statement in
    0.3-0.7 ms, one that has just run one in 0.1 ms. Lent in turn, every connection of the pool sleeps
    between its statements as long as all of them take; lent most recent first, the few that the load needs
    stay warm and the others idle (and the pool's max_idle closes them sooner). SQLAlchemy's pool_use_lifo
    does the same. psycopg_pool has no such option: this turns its deque of ready connections, under its
    lock, so that its own lending takes the last returned. Should a later psycopg_pool rename either, the
    pool lends in its own order again (tests/test_store.py notices)."""
    from psycopg_pool import ConnectionPool

    class RecentFirstPool(ConnectionPool):
        def _get_ready_connection(self, timeout):
            ready = getattr(self, "_pool", None)
            if ready:
                ready.rotate(1)  # the last returned first, the others in their order
            return super()._get_ready_connection(timeout)

    return RecentFirstPool


class BackgroundCall:
    """A call on a daemon thread of its own, whose caller can stop waiting for it (and then leave it)."""

    def __init__(self, function: Callable[[], None], name: str):
        self.done, self.error = threading.Event(), None
        threading.Thread(target=self._run, args=(function,), name=name, daemon=True).start()

    def _run(self, function: Callable[[], None]) -> None:
        try:
            function()
        except Exception as error:
            self.error = error
        finally:
            self.done.set()


def open_store(database: str, settings: Settings = DEFAULTS) -> JobStore:
    """The store a --db value names: a postgresql:// URL, or else the path of a SQLite file."""
    if database.startswith(("postgresql:", "postgres:")):
        return PostgresStore(database, settings.busy_timeout, settings.db_connections, settings.lease)
    return SQLiteStore(database, settings.busy_timeout)


def redacted(database: str) -> str:
    """A --db value fit to print: any password in it replaced by ***."""
    return scrubbed(database, database)


def scrubbed(text: str, database: str) -> str:
    """text (a --db value, or an error about it) with the database's password replaced by ***, wherever it
    shows: each password the value gives (in its URL, however malformed; in a parameter whose name decodes
    to password; in a key=value connection string), raw or percent-decoded, and then anything in the text
    shaped like one."""
    for password in sorted(database_passwords(database), key=len, reverse=True):
        text = text.replace(password, "***")
    text = re.sub(r"(://[^/?#@\s]*?:)[^@\s]*@", r"\1***@", text)
    text = re.sub(r"([?&][^=&\s]+=)[^&\s]*",
                  lambda m: m.group(1) + "***" if password_name(m.group(1)[1:-1]) else m.group(), text)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", text, flags=re.IGNORECASE)


def database_passwords(database: str) -> set[str]:
    """Every password a --db value may hold (over-generous, which only hides more)."""
    found = set()
    if "://" in database:
        if userinfo := re.match(r"[^:/?#]*://[^/?#@:]*:(.*)@", database, re.DOTALL):  # to the last @
            found.add(userinfo.group(1))
        found.update(value for name, value in re.findall(r"[?&]([^=&]*)=([^&]*)", database)
                     if password_name(name))
    else:  # a key=value connection string
        found.update(value.strip("'") for value in re.findall(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)",
                                                              database, re.IGNORECASE))
    found |= {urllib.parse.unquote(value) for value in found}
    return {value for value in found if value}


def password_name(name: str) -> bool:
    return urllib.parse.unquote(name).strip().lower() == "password"

#
# Metrics: this instance's figures for Prometheus, made with prometheus_client.
#

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class Metrics:
    """Counters and a histogram kept as things happen, and gauges read when Prometheus scrapes (LiveFigures),
    in a registry of the app's own so that tests can build many apps. Labels are template names, endpoints,
    status words and rule names: never a variable's value or a key. A template that is no longer in force is
    counted as "other", so the template label only ever names templates that exist."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.template_names: Callable[[], frozenset[str]] = frozenset
        self.labelled: set[str] = set()  # the template names that label a series
        self.jobs_triggered = Counter("jobserver_jobs_triggered", "Jobs triggered on this instance, by"
                                      " template and by where from (api or page)", ["template", "via"],
                                      registry=self.registry)
        self.jobs_finished = Counter("jobserver_jobs_finished", "Jobs this instance ran to their end (or"
                                     " ended in Error for an instance that stopped), by template and final"
                                     " status", ["template", "status"],
                                     registry=self.registry)
        self.job_duration = Histogram("jobserver_job_duration_seconds", "How long the jobs counted in"
                                      " jobserver_jobs_finished took, from claim to end, by template",
                                      ["template"],
                                      buckets=DURATION_BUCKETS, registry=self.registry)
        self.http_requests = Counter("jobserver_http_requests", "HTTP requests answered, by endpoint and"
                                     " status code", ["endpoint", "code"], registry=self.registry)
        self.log_entries = Counter("jobserver_log_entries_stored", "Log entries this instance stored",
                                   registry=self.registry)
        self.refused = Counter("jobserver_requests_refused", "Requests refused by the Host rule (host), the"
                               " cross-site rule (cross-site) and the key throttle (key-throttle)", ["rule"],
                               registry=self.registry)

    def template(self, name: str) -> str:
        if name in self.template_names():
            self.labelled.add(name)
            return name
        return "other"

    def job_triggered(self, template: str, via: str) -> None:
        self.jobs_triggered.labels(self.template(template), via).inc()

    def job_finished(self, template: str, status: str, seconds: float) -> None:
        label = self.template(template)
        self.jobs_finished.labels(label, status).inc()
        self.job_duration.labels(label).observe(seconds)

    def observe_live(self, collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.forget_removed_templates()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def forget_removed_templates(self) -> None:
        """Drop the series of templates no longer in force (a reload removed them): the template label names
        only templates that exist. Their jobs that end later count under "other"."""
        for name in self.labelled - self.template_names():
            self.labelled.discard(name)
            series = [(self.jobs_triggered, (name, via)) for via in ("api", "page")]
            series += [(self.jobs_finished, (name, status)) for status in FINAL_STATUSES]
            series.append((self.job_duration, (name,)))
            for metric, labels in series:
                with contextlib.suppress(KeyError):  # prometheus_client before 0.21: a series never made
                    metric.remove(*labels)


class LiveFigures:
    """The gauges, read from the store, the runner and the waits when Prometheus scrapes."""

    def __init__(self, store: JobStore, runner: JobRunner, watch: JobWatch):
        self.store, self.runner, self.watch = store, runner, watch

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            pending = self.store.count_jobs(PENDING)
        except StoreError:
            pending = None
        if pending is not None:
            yield GaugeMetricFamily("jobserver_jobs_pending", "Pending jobs in the database (shared by every"
                                    " instance: take the max over instances, not the sum)", value=pending)
        yield GaugeMetricFamily("jobserver_jobs_executing", "Jobs this instance runs now",
                                value=len(self.runner.running))
        workers = GaugeMetricFamily("jobserver_workers", "This instance's job workers, busy or idle",
                                    labels=["state"])
        busy = len(self.runner.running)
        workers.add_metric(["busy"], busy)
        workers.add_metric(["idle"], max(0, self.runner.settings.workers - busy))
        yield workers
        yield GaugeMetricFamily("jobserver_long_polls_waiting", "Requests held open by wait on this instance",
                                value=self.watch.waiting)
        yield CounterMetricFamily("jobserver_store_errors", "Reads and writes of the job store that failed",
                                  value=self.store.failures)

#
# Waiting for jobs: requests held by `wait` until their job moves on.
#


class WatchedJob:
    """The requests waiting on one job, and the newest progress known of it. Each waiter sleeps on a lock of
    its own, which an update releases: a thousand waiters wake without queueing for one shared lock."""

    __slots__ = ("progress", "sleepers", "waiters")

    def __init__(self, progress: Progress):
        self.progress = progress
        self.sleepers: list[threading.Lock] = []
        self.waiters = 0


class JobWatch:
    """Requests that wait for a job to log or end (status, logs and cancel). Each sleeps until the store's
    events, which carry the job's new progress, say its job moved on, so a thousand waiters cost no reads;
    recheck() re-reads the watched jobs on an interval, in one statement, in case an event was missed
    (another instance's notification lost, or a reconnect). Each waiting request holds one HTTP thread: at
    most max_followers wait at once, and a request beyond that is answered at once with what there is."""

    RECENT = 4096  # jobs whose latest progress is remembered, for a waiter that comes just after its event

    def __init__(self, store: JobStore, max_followers: int = DEFAULTS.max_followers):
        self.store, self.max_followers = store, max_followers
        self.jobs: dict[int, WatchedJob] = {}
        self.recent: OrderedDict[int, Progress] = OrderedDict()
        self.lock = threading.Lock()
        self.waiting = 0
        self.closed = False

    def wait(self, job_id: int, known: Progress, done: Callable[[Progress], bool],
             timeout: float) -> Progress:
        """Wait up to timeout seconds until done(progress) holds; returns the progress then (or at the end of
        the wait, or early when the server must: shutting down, or too many waiting)."""
        if done(known) or timeout <= 0:
            return known
        deadline = time.monotonic() + timeout
        with self.lock:
            if self.closed or self.waiting >= self.max_followers:
                return known
            watched = self.jobs.get(job_id)
            if watched is None:
                watched = self.jobs[job_id] = WatchedJob(known)
            # An event may have come between the request's read and now: it is among the recent ones.
            watched.progress = known.newer(watched.progress).newer(self.recent.get(job_id))
            watched.waiters += 1
            self.waiting += 1
        try:
            while True:
                with self.lock:
                    progress = watched.progress
                    remaining = deadline - time.monotonic()
                    if done(progress) or self.closed or remaining <= 0:
                        return progress
                    sleeper = threading.Lock()
                    sleeper.acquire()
                    watched.sleepers.append(sleeper)
                sleeper.acquire(timeout=remaining)  # released by update() or close()
        finally:
            with self.lock:
                self.waiting -= 1
                watched.waiters -= 1
                if not watched.waiters:
                    del self.jobs[job_id]

    def known(self, job_id: int) -> Progress | None:
        """The latest progress of the job that an event told, if it was recent."""
        with self.lock:
            return self.recent.get(job_id)

    def update(self, job_id: int, progress: Progress) -> None:
        """A job moved on: remember it a while, and wake its waiters."""
        with self.lock:
            self.recent[job_id] = progress.newer(self.recent.pop(job_id, None))
            if len(self.recent) > self.RECENT:
                self.recent.popitem(last=False)
            watched = self.jobs.get(job_id)
            if watched is None:
                return
            newer = progress.newer(watched.progress)
            if newer == watched.progress:
                return
            watched.progress = newer
            sleepers, watched.sleepers = watched.sleepers, []
        for sleeper in sleepers:
            sleeper.release()

    def recheck(self) -> None:
        """Re-read every watched job in one statement and wake the waiters of those that moved on."""
        job_ids = list(self.jobs)
        if job_ids:
            for job_id, progress in self.store.progress_of(job_ids).items():
                self.update(job_id, progress)

    def close(self) -> None:
        """Answer every wait now (the server is stopping), and every later one at once."""
        with self.lock:
            self.closed = True
            sleepers = [sleeper for watched in self.jobs.values() for sleeper in watched.sleepers]
            for watched in self.jobs.values():
                watched.sleepers = []
        for sleeper in sleepers:
            sleeper.release()


#
# Job runner: worker threads claim jobs from the store and run their steps as processes.
#


class JobExecution:
    """One job running on a worker thread: its steps, its processes and its log, until it is final."""

    def __init__(self, runner: JobRunner, claim: Claim, template: JobTemplate, owner: str):
        self.runner, self.store, self.template, self.owner = runner, runner.store, template, owner
        self.job_id = claim.id
        self.variables = claim.variables
        self.values = {name.lower(): value for name, value in claim.variables.items()}  # for substitution
        self.values.update(jobtoken=str(claim.id), templatename=template.name, jobinstance=owner)
        self.masker = Masker(claim.variables.get(name) for name in template.secret_names)
        self.started = time.monotonic()
        self.seq = 0  # of the next entry to store
        self.buffer: list[tuple[str, str]] = []
        self.buffered_since = 0.0
        self.worst = "DEBUG"
        self.log_bytes = 0
        self.dropped_lines = self.dropped_bytes = 0  # past the template's log budget
        self.unstorable_lines = 0  # past MAX_UNSTORED_ENTRIES while the store was away
        self.stop_reason: str | None = None  # logged as an ERROR entry as soon as the job notices it
        # for the operator's event: timeout, cancel, shutdown, store, lease
        self.stop_cause: str | None = None
        self.stop_logged = False
        self.stop_graceful = False
        self.failure: dict = {}  # the step that failed and how, for the operator's event
        self.process: subprocess.Popen | None = None
        self.unstored: str | None = None  # why the buffer could not be stored, while it cannot
        self.retry_at = 0.0
        self.disowned = False  # the store says this instance no longer owns the job
        self.ending = False  # its final status is being stored: from then on, the store says what it is
        self.following: Claim | None = None  # the next job, claimed in one statement with this one's end

    # Log entries.

    def log(self, level: str, text: str) -> None:
        """Log a message of the runner's or a log step's, one entry per line (a final newline ends the last
        line, it starts no empty one), never dropped."""
        for line in self.masker.text(text).removesuffix("\n").split("\n"):
            self._buffer(level, sanitize_line(line))

    def log_output(self, level: str, raw: bytes) -> None:
        """Log one entry of a process's output (a line, or a piece of a long one: see OutputCutter), masked,
        within the log budget, which counts the output as it came. While the store cannot take the log, the
        output waits in memory up to MAX_UNSTORED_ENTRIES; past that it is dropped and the job is stopped."""
        if len(self.buffer) >= MAX_UNSTORED_ENTRIES:
            self.unstorable_lines += 1
            self.stop_for_store()
            return
        if self.log_bytes + len(raw) > self.template.max_log_bytes:
            self.dropped_lines += 1
            self.dropped_bytes += len(raw)
            return
        self.log_bytes += len(raw)
        self._buffer(level, sanitize_line(self.masker.output(raw).decode("utf-8", "replace")))

    def _buffer(self, level: str, line: str) -> None:
        if not self.buffer:
            self.buffered_since = time.monotonic()
        self.buffer.append((level, line))
        if level != self.worst and LEVEL_RANK[level] > LEVEL_RANK[self.worst]:
            self.worst = level
        if len(self.buffer) >= LOG_FLUSH_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Store the buffered entries. While the store fails they wait in memory, retried every half second;
        past MAX_UNSTORED_ENTRIES the job is stopped."""
        if not self.buffer or self.disowned or time.monotonic() < self.retry_at:
            return
        try:
            owned = self.store.append_logs(self.job_id, self.owner, self.seq, self.buffer)
        except StoreError as error:
            self.unstored, self.retry_at = str(error), time.monotonic() + 0.5
            if len(self.buffer) >= MAX_UNSTORED_ENTRIES:
                self.stop_for_store()
            return
        self.unstored = None
        if not owned:
            self.disown()
            return
        self.runner.metrics.log_entries.inc(len(self.buffer))
        self.seq += len(self.buffer)
        self.buffer = []

    def stop_for_store(self) -> None:
        if self.stop_reason is None:
            self.request_stop(f"Could not store the job's log ({self.unstored or 'the store failed'}) while"
                              f" {len(self.buffer)} entries waited; the job was stopped", graceful=False,
                              cause="store")

    def flush_if_due(self) -> None:
        if self.buffer and time.monotonic() - self.buffered_since >= LOG_FLUSH_SECONDS:
            self.flush()

    def disown(self) -> None:
        """Another instance ended this job (this one's lease had run out):
        stop its processes, write nothing."""
        self.disowned = True
        self.request_stop("The job was ended by another instance", graceful=False, cause="lease")

    # Stopping from other threads (cancel, shutdown, a lost lease).

    def request_stop(self, reason: str, graceful: bool, cause: str) -> None:
        """Stop the job: its processes get SIGTERM
        (graceful, then SIGKILL after the cancel grace) or SIGKILL."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_graceful, self.stop_cause = reason, graceful, cause
        elif not graceful:
            self.stop_graceful = False
        process = self.process
        if process is not None:
            signal_group(process.pid, signal.SIGTERM if self.stop_graceful else signal.SIGKILL)

    # Running.

    def run(self) -> None:
        """Run every step, then store the final status; whatever happens, the job ends final (unless another
        instance ended it)."""
        try:
            deadline = time.monotonic() + self.template.timeout if self.template.timeout else None
            for number, step in enumerate(self.template.steps, 1):
                if self.stop_reason or not self.run_step(step, number, deadline):
                    break
            self.announce_stop()
        except Exception as error:  # a bug here must not leave the job Executing
            traceback.print_exc()
            self.log("ERROR", f"Internal error in the job runner: {error!r}")
            self.failure = self.failure or {"reason": "internal error"}
        self.finish()

    def announce_stop(self) -> None:
        if self.stop_reason and not self.stop_logged:
            self.stop_logged = True
            self.log("ERROR", self.stop_reason)

    def run_step(self, step: Step, number: int, job_deadline: float | None) -> bool:
        """Run one step; whether the job goes on."""
        if step.kind == "log":
            self.log(step.level, substitute(step.command, self.values))
            return True
        if step.name:
            self.log("DEBUG", f"Step: {step.name}")
        if step.kind == "run":
            argv = ["/bin/sh", "-c", step.command]
        else:
            argv = [substitute(argument, self.values) for argument in step.command]
        deadline, why = job_deadline, f"Job timed out after {self.template.timeout or 0:g} s"
        if step.timeout and (deadline is None or time.monotonic() + step.timeout < deadline):
            deadline, why = time.monotonic() + step.timeout, f"Step timed out after {step.timeout:g} s"
        code = self.run_process(step, argv, deadline, why)
        label = step.name or str(number)  # one type for log shippers: a name, or else the step's number
        if code is None:  # timed out, stopped, or could not start
            self.failure = self.failure or {"step": label, "reason": self.stop_cause or "could not start"}
            return False
        if code != 0:
            self.log("ERROR", f"Process exited with code: {code}")
            self.failure = self.failure or {"step": label, "exit_code": code}
            return step.continue_on_error
        return True

    def environment(self, step: Step) -> dict[str, str]:
        """A minimal base, the job's variables, the step's fixed env, then the built-ins: last, since the job
        and the instance running it are how another instance on this machine finds the job's processes
        should this one die (kill_processes_of)."""
        env = {"PATH": BASE_PATH, "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8"}
        env.update(self.variables)
        env.update(step.env)
        env.update(JobToken=str(self.job_id), TemplateName=self.template.name, JobInstance=self.owner)
        return env

    def run_process(self, step: Step, argv: list[str], deadline: float | None, why: str) -> int | None:
        """Run one process in a group of its own, logging its output; its exit code, or None if it timed
        out, was stopped or could not start. Nothing of its process group outlives this call."""
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self.environment(step), cwd=step.cwd, start_new_session=True,
            )
        except OSError as error:
            where = f" in {step.cwd!r}" if step.cwd else ""
            self.log("ERROR", f"Cannot start '{argv[0]}'{where}: {error.strerror or error}")
            return None
        self.process = process
        if self.stop_reason:  # a stop that came while the process was starting
            self.request_stop(self.stop_reason, self.stop_graceful, self.stop_cause)
        try:
            return self.supervise(process, step, deadline, why)
        finally:
            self.process = None  # no more signals from other threads: the pid is about to be reaped
            signal_group(process.pid, signal.SIGKILL)  # the leader is not reaped yet: the group id is ours
            process.wait()
            process.stdout.close()
            process.stderr.close()

    def supervise(self, process: subprocess.Popen, step: Step, deadline: float | None,
                  why: str) -> int | None:
        """Read the process's output until both its pipes close and it has exited, doing what falls due on the
        way (see StepTimers); its exit code, or None when it was stopped."""
        secrets = self.masker.raw
        streams = {process.stdout.fileno(): (step.stdout_level, OutputCutter(secrets)),
                   process.stderr.fileno(): (step.stderr_level, OutputCutter(secrets))}
        timers = StepTimers(deadline, why)
        poller = select.poll()  # no descriptor of its own to set up and close, unlike epoll, for each process
        exit_watch = process_exit_watch(process.pid)
        try:
            for fd in streams:
                os.set_blocking(fd, False)
                poller.register(fd, select.POLLIN)
            if exit_watch is not None:
                poller.register(exit_watch, select.POLLIN)
            while streams or timers.exited_at is None:
                now = time.monotonic()
                if timers.exited_at is None and exit_watch is None and process_exited(process.pid):
                    timers.exited_at = now
                if not self.act_on_due(timers, process.pid, bool(streams), now):
                    break  # the output is abandoned
                timers.quiet = True
                # POLLIN, or POLLHUP at the end
                for fd, _ in poller.poll(self.next_wakeup(timers, now) * 1000):
                    if fd == exit_watch:
                        poller.unregister(exit_watch)
                        timers.exited_at = time.monotonic()
                        continue
                    timers.quiet = False
                    if not self.read_output(fd, streams, timers):
                        poller.unregister(fd)
                        del streams[fd]
                self.flush_if_due()
            code = process_exit_code(process)
        finally:
            if exit_watch is not None:
                os.close(exit_watch)
        return None if self.stop_reason else code

    def act_on_due(self, timers: StepTimers, group: int, output_open: bool, now: float) -> bool:
        """Do what is due at `now`: stop at the deadline, kill when a stop's grace is over, kill leftovers
        that hold the output after the step exited; False when the output is to be abandoned."""
        if timers.deadline is not None and now >= timers.deadline and self.stop_reason is None:
            self.request_stop(f"{timers.why}; its processes were killed", graceful=False, cause="timeout")
        if self.stop_reason and timers.kill_at is None:
            self.announce_stop()
            timers.kill_at = now + (self.runner.settings.cancel_grace if self.stop_graceful else 0)
        if timers.kill_at is not None and now >= timers.kill_at:
            signal_group(group, signal.SIGKILL)
            timers.kill_at, timers.killed_at = float("inf"), timers.killed_at or now
        if timers.exited_at is None or not output_open or not timers.held_open():
            return True
        if timers.killed_at is None and now - timers.exited_at >= LEFTOVER_GRACE:
            self.log("WARN", f"The step exited but processes it started still held its output open after "
                             f"{LEFTOVER_GRACE:g} s; they were killed")
            signal_group(group, signal.SIGKILL)
            timers.killed_at = now
        elif timers.killed_at is not None and now - timers.killed_at >= LEFTOVER_GRACE:
            # Only a process that left the group (setsid) can still hold the output: stop reading it.
            self.log("WARN", "Processes that left the step's process group still hold its output;"
                             " it is no longer read and they are left running")
            return False
        return True

    def next_wakeup(self, timers: StepTimers, now: float) -> float:
        """Seconds until something may fall due: a flush of the buffer, the deadline, or the next look."""
        wait = POLL_SECONDS
        if self.buffer:
            wait = min(wait, max(0.0, self.buffered_since + LOG_FLUSH_SECONDS - now))
        if timers.deadline is not None and self.stop_reason is None:
            wait = min(wait, max(0.0, timers.deadline - now))
        return wait

    def read_output(self, fd: int, streams: dict, timers: StepTimers) -> bool:
        """Log what a pipe has ready; False once it is closed (its unfinished last line logged too)."""
        level, cutter = streams[fd]
        chunk = os.read(fd, 65536)
        if timers.exited_at is not None:
            timers.read_after_exit += len(chunk)
        for entry in cutter.feed(chunk) if chunk else cutter.end():
            self.log_output(level, entry)
        return bool(chunk)

    def stored_as_ours(self, status: str) -> bool:
        """Whether this job's end as stored is the one this instance sent: its status, and its log ending with
        this instance's last entry (the instance that ends another's job adds an entry of its own)."""
        expected = self.seq + len(self.buffer)
        progress = self.store.progress_of([self.job_id]).get(self.job_id)
        if progress is None or progress != Progress(status, expected):
            return False
        if not self.buffer:
            return True
        level, message = self.buffer[-1]
        return self.store.read_logs(self.job_id, expected - 1, expected) == f"{level}: {message}\n"

    def finish(self) -> None:
        """Store the last entries and the final status, retrying while the store fails, until the server
        stops; then tell the operator."""
        if self.dropped_lines:
            self.log("WARN", f"The log reached its limit of {self.template.max_log_bytes} bytes: "
                             f"{self.dropped_lines} lines ({self.dropped_bytes} bytes) of output "
                             f"were dropped")
        if self.unstorable_lines:
            self.log("WARN", f"{self.unstorable_lines} entries of output were dropped while the log could not"
                             f" be stored")
        self.announce_stop()
        status = STATUS_BY_WORST_LEVEL[self.worst]
        self.ending = True
        delay = 0.5
        unsure = False  # whether a failed attempt may have been stored all the same, its answer lost
        while not self.disowned:
            # Jobs were triggered: claim one with the end. Not at the end of a limited template's job, whose
            # freed slot the claim would not yet see (its "work" event sends a worker for the next in line).
            claims_next = self.template.max_concurrent is None and not unsure and self.runner.take_hint()
            try:
                if claims_next:
                    owned, self.following = self.store.finish_job_and_claim(self.job_id, self.owner, status,
                                                                            self.seq, self.buffer)
                else:
                    owned = self.store.finish_job(self.job_id, self.owner, status, self.seq, self.buffer)
                # not owned: ended by another instance, which found this one's lease run out; or a retried
                # finish whose first attempt went through while its answer was lost
                ended_elsewhere = not owned and not (unsure and self.stored_as_ours(status))
            except StoreError as error:
                unsure = True
                if claims_next:
                    self.runner.hint()  # the hint goes back to the workers
                if self.runner.stopping.wait(delay):
                    event(logging.ERROR, "job.unfinished", "job end not stored", token=self.job_id,
                          template=self.template.name, reason=str(error))
                    return
                delay = min(delay * 2, 5.0)
                continue
            if ended_elsewhere:
                self.disowned = True
                break
            self.runner.metrics.log_entries.inc(len(self.buffer))
            self.seq += len(self.buffer)
            self.buffer = []
            duration = time.monotonic() - self.started
            self.runner.metrics.job_finished(self.template.name, status, duration)
            level = logging.WARNING if status == ERROR else logging.INFO
            event(level, "job.finished", "job finished", token=self.job_id, template=self.template.name,
                  status=status, duration=round(duration, 3), **(self.failure if status == ERROR else {}))
            return
        event(logging.WARNING, "job.disowned", "job ended by another instance", token=self.job_id,
              template=self.template.name)


@dataclasses.dataclass
class StepTimers:
    """The times that decide what happens to a running step: its deadline (and what to say when it passes),
    when it exited, when its process group is to be killed after a stop, and when it was killed; and what
    tells, once it exited, whether other processes hold its output open."""

    deadline: float | None
    why: str
    exited_at: float | None = None
    kill_at: float | None = None
    killed_at: float | None = None
    quiet: bool = True  # the last poll found nothing to read: the pipes are open but silent
    read_after_exit: int = 0  # bytes read since the step exited

    def held_open(self) -> bool:
        """Whether processes other than the step's own hold its output: silent pipes that stay open, or more
        output than the pipes could have held when it exited (under load a worker may wait a while for its
        turn to read what was already there)."""
        return self.quiet or self.read_after_exit > 2 * 65536


def signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def process_exit_watch(pid: int) -> int | None:
    """A descriptor that becomes readable when the process exits (Linux pidfd), or None to poll."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def process_exited(pid: int) -> bool:
    """Whether the process exited, without reaping it (so its process group id stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def process_exit_code(process: subprocess.Popen) -> int:
    """The exit code of a process that has exited, not reaped yet; a signal N counts as 128 + N."""
    result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return 128 + result.si_status


def kill_processes_of(jobs: set[tuple[int, str]]) -> None:
    """Kill every process group on this machine in which a process of these jobs runs, given as (job id,
    instance) pairs: a process whose environment, as it was started, names both (JobToken, and JobInstance,
    which JobExecution.environment sets last). No note of the groups is needed, so a step is found from its
    first instruction, and its group also once its leader has gone. A process that a finished job left
    running (a daemon it started) names another job, and is left alone."""
    wanted: dict[bytes, set[bytes]] = {}
    for job_id, instance in jobs:
        wanted.setdefault(b"JobInstance=" + instance.encode(), set()).add(b"JobToken=%d" % job_id)
    killed = {0, 1, os.getpgrp()}
    for entry in os.scandir("/proc") if wanted else ():
        if not entry.name.isdigit():
            continue
        try:
            names = set(Path(entry.path, "environ").read_bytes().split(b"\0"))
            if not any(names & tokens for instance, tokens in wanted.items() if instance in names):
                continue
            group = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[2])  # its pgrp
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not this user's
        if group not in killed:  # at once: the scan may yet wait on a process stuck in the kernel
            signal_group(group, signal.SIGKILL)
            killed.add(group)


def kill_noted_group(group: int, job_id: int) -> None:
    """Kill the process group that an earlier app.py noted for a job (process_groups), if it is still that
    job's (its leader's environment names the job), so that a reused pid is never signalled."""
    try:
        environ = Path(f"/proc/{group}/environ").read_bytes()
    except OSError:
        return
    if b"\0JobToken=%d\0" % job_id in b"\0" + environ:
        signal_group(group, signal.SIGKILL)


class JobRunner:
    """This instance's worker threads: each claims the oldest claimable job from the store and runs it.

    The database is the queue: claiming marks a job Executing for this instance (its identity, new at every
    start), and the store enforces max_concurrent. The store's events wake idle workers; they also look on
    their own every second, in case an event was missed. A heartbeat thread renews the instance's lease, ends
    the jobs of instances whose lease ran out (killing their processes when they ran on this machine), and
    notices cancels and missed events (JobWatch.recheck)."""

    def __init__(self, store: JobStore, catalog: TemplateCatalog, watch: JobWatch, metrics: Metrics,
                 settings: Settings = DEFAULTS):
        self.store, self.catalog, self.watch, self.metrics, self.settings = (
            store, catalog, watch, metrics, settings)
        self.instance = new_instance_id()
        self.lock = threading.Condition()
        self.hints = 0  # claims worth trying now, at most one per worker
        self.idle = 0  # workers waiting for work
        self.handed: deque[tuple[Claim, str]] = deque()  # jobs claimed by a trigger for an idle worker, and owner
        self.reserved = 0  # triggers counting on an idle worker, their statement under way
        self.running: dict[int, JobExecution] = {}
        self.accepting = True
        self.stopping = threading.Event()  # no more claims; waits answer now
        self.stopped = threading.Event()  # running jobs are done: the heartbeat ends
        self.hurry = threading.Event()  # set by a second Ctrl-C: end the shutdown grace now
        self.threads: list[threading.Thread] = []
        self.lease_renewed = time.monotonic()
        self.lease_lapsing = False  # this instance stopped its jobs because it could not renew its lease
        self.pending_count, self.pending_read_at = 0, float("-inf")

    def start(self) -> None:
        """Register this instance, end what dead instances left Executing,
        start the workers and the heartbeat."""
        self.store.register_instance(self.instance, self.settings.lease)
        self.end_orphaned_jobs()
        for number in range(self.settings.workers):
            self._thread(self._work, f"job-worker-{number}")
        self._thread(self._heartbeat, "heartbeat")
        self._thread(self._lease_watchdog, "lease-watchdog")
        self.hint(self.settings.workers)

    def _thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def alive(self) -> bool:
        """Whether every worker and the heartbeat still run (they catch everything, so they should)."""
        return bool(self.threads) and all(thread.is_alive() for thread in self.threads)

    # Events from the store.

    def on_event(self, happening: StoreEvent) -> None:
        if happening.kind == "work":
            self.hint()
        elif happening.kind == "cancel":
            self.stop_if_running(happening.job_id, "Job canceled", cause="cancel")
        elif happening.kind == "resync":
            self.hint(self.settings.workers)

    def take_hint(self) -> bool:
        """Whether a worker ending its job should claim the next one with the end: a hint waits (jobs were
        triggered), which it then takes, and this instance is claiming."""
        with self.lock:
            if self.hints and not self.stopping.is_set() and not self.lease_lapsing:
                self.hints -= 1
                return True
            return False

    def hint(self, count: int = 1) -> None:
        with self.lock:
            self.hints = min(self.hints + count, self.settings.workers)
            self.lock.notify_all()  # a worker a trigger counts on leaves the hint to the others

    # Triggering.

    def submit(self, template: JobTemplate, variables: dict[str, str]) -> int:
        """Commit a new job (the store's event wakes a worker); its id is returned only once it is committed.
        When a worker is idle that nothing else will take, a job of an unlimited template is committed already
        claimed, if the queue is empty, and handed to that worker: one statement fewer on its way to run."""
        if not self.accepting:
            raise NotAccepting("The server is shutting down and accepts no new jobs", retry_after=30)
        pending = self.pending_estimate()
        if pending >= self.settings.max_pending:
            raise NotAccepting(f"The queue is full ({pending} pending jobs); try again later", retry_after=5)
        with self.lock:
            direct = (template.max_concurrent is None and not self.lease_lapsing and self.accepting
                      and self.idle > self.hints + len(self.handed) + self.reserved)
            self.reserved += direct
        if not direct:
            job_id = self.store.insert_job(template, variables)
            self.pending_count += 1
            return job_id
        started, owner = False, self.instance
        try:
            job_id, started = self.store.insert_started_job(template, variables, owner)
        finally:
            with self.lock:
                self.reserved -= 1
                if started:
                    self.handed.append((Claim(job_id, template.version, dict(variables)), owner))
                self.lock.notify_all()  # the idle workers, and a shutdown waiting for this
        if not started:
            self.pending_count += 1
        return job_id

    def pending_estimate(self) -> int:
        """The Pending jobs, read from the store at most once a second and counted on between reads."""
        if time.monotonic() - self.pending_read_at > 1.0:
            self.pending_count, self.pending_read_at = self.store.count_jobs(PENDING), time.monotonic()
        return self.pending_count

    # Workers.

    def _work(self) -> None:
        following = None  # (claim, owner): claimed with the end of this worker's last job
        while True:
            if following is not None:
                following = self._run_handed(*following)
                continue
            with self.lock:
                handed = self._wait_for_work()
            if handed is not None:
                following = self._run_handed(*handed)
                continue
            if self.stopping.is_set():
                return
            if self.lease_lapsing:
                continue
            try:
                claim = self.store.claim_job(self.instance)
            except StoreError:
                self.stopping.wait(1.0)  # the store's own event tells the operator
                continue
            except Exception:
                traceback.print_exc()
                continue
            if claim is not None:
                following = self._run(self._claimed(claim), self.instance)

    def _claimed(self, claim: Claim) -> Claim:
        """A claim this instance's worker made: one Pending job fewer, and another worker looks if more wait."""
        self.pending_count = max(0, self.pending_count - 1)
        if claim.more:
            self.hint()  # another worker looks for the next one
        return claim

    def _wait_for_work(self) -> tuple[Claim, str] | None:
        """Under the lock: wait for a job handed over by a trigger (returned), a hint, or a second's quiet
        (then None: claim from the store). A worker that a trigger counts on (submit) waits for its job."""
        self.idle += 1
        try:
            # An idle worker beyond those that triggers count on may take a hint, or look on its own now and then.
            while not self.handed and not self.stopping.is_set():
                if self.hints and self.idle > self.reserved:
                    break
                if not self.lock.wait(1.0) and self.idle > self.reserved:
                    break
            if self.handed:
                return self.handed.popleft()
            self.hints = max(0, self.hints - 1)
            return None
        finally:
            self.idle -= 1

    def _run_handed(self, claim: Claim, owner: str) -> tuple[Claim, str] | None:
        """Run a job claimed elsewhere than in the worker's loop (by a trigger, or with the end of the worker's
        last job), unless this instance lost that identity or is stopping its jobs for its lease meanwhile:
        then the job is left Executing under its claim, and ended in Error like any claim that never started
        (end_lost_claims, or another instance's sweep)."""
        if owner == self.instance and not self.lease_lapsing:
            return self._run(claim, owner)
        return None

    def _run(self, claim: Claim, owner: str) -> tuple[Claim, str] | None:
        """Run a claimed job to its end; a job whose template version no longer loads ends in Error. Returns
        the next job when one was claimed with this one's end, and its owner."""
        try:
            template = self.catalog.version(claim.template_version)
        except (TemplateError, StoreError, ValueError) as error:
            self._refuse_claim(claim, owner, f"Its template cannot be loaded: {error}")
            return None
        execution = JobExecution(self, claim, template, owner)
        with self.lock:
            self.running[claim.id] = execution
        try:
            event(logging.INFO, "job.started", "job started", token=claim.id, template=template.name,
                  instance=owner)
            execution.run()
        except Exception:  # keep the worker alive whatever happens
            traceback.print_exc()
        finally:
            with self.lock:
                del self.running[claim.id]
        return (self._claimed(execution.following), owner) if execution.following is not None else None

    def _refuse_claim(self, claim: Claim, owner: str, reason: str) -> None:
        try:
            self.store.finish_job(claim.id, owner, ERROR, 0, [("ERROR", reason)])
        except StoreError:
            pass  # it stays Executing under this instance: ended when this instance's lease ends
        event(logging.WARNING, "job.finished", "job finished", token=claim.id, status=ERROR, reason=reason)

    # Cancel.

    def cancel(self, job_id: int) -> str | None:
        """Cancel a Pending or Executing job, on whichever instance runs it; it ends in Error. Returns the
        status after the request (waiting for an executing job to end), None for no such job."""
        outcome = self.store.cancel_job(job_id)
        if outcome == "canceled":
            self.pending_count = max(0, self.pending_count - 1)
        elif outcome == "requested":
            self.stop_if_running(job_id, "Job canceled", cause="cancel")
            self.watch.wait(job_id, Progress(EXECUTING, 0),
                            lambda progress: progress.status in FINAL_STATUSES,
                            self.settings.cancel_grace + 5)
        return self.store.job_status(job_id)

    def running_job(self, job_id: int) -> JobRecord | None:
        """A job this instance runs, as the store would read it, without reading it: Executing (its claim was
        committed so) until its final status is being stored, with the entries stored so far. None when the
        store must say: a job not running here, one that is ending, one whose lease may have run out."""
        execution = self.running.get(job_id)
        if (execution is None or execution.ending or execution.disowned or execution.unstored is not None
                or execution.owner != self.instance or self.lease_lapsing
                or time.monotonic() - self.lease_renewed > self.settings.lease / 2):
            return None  # ending, ended elsewhere, a write's outcome unknown, or the lease in doubt
        template, known = execution.template, self.watch.known(job_id)
        if known is not None and known.status in FINAL_STATUSES:
            return None  # another instance ended it (the watch's re-read heard), and this one has not yet seen
        count = max(execution.seq, known.count if known else 0)  # the watch hears of a write before seq moves
        return JobRecord(job_id, template.name, template.version, EXECUTING, template.key_digest, count)

    def stop_if_running(self, job_id: int, reason: str, cause: str) -> None:
        execution = self.running.get(job_id)
        if execution is not None:
            execution.request_stop(reason, graceful=cause == "cancel", cause=cause)

    # The heartbeat: lease, orphans, cancels, missed events.

    def _heartbeat(self) -> None:
        lease = self.settings.lease
        # Renewed often (a statement every lease/10 s): what an outage of the store may last before the
        # watchdog stops the jobs is three quarters of the lease less the time since the last renewal.
        next_renewal = time.monotonic() + lease / 10
        next_sweep = time.monotonic() + lease / 2
        while not self.stopped.wait(RECHECK_SECONDS):
            try:
                now = time.monotonic()
                if now >= next_renewal:
                    next_renewal = now + 1.0  # while renewals fail, each second: the lease is what runs out
                    self.renew_lease()
                    next_renewal = now + lease / 10
                if now >= next_sweep:
                    next_sweep = now + lease / 2
                    self.end_orphaned_jobs()
                    self.end_lost_claims()
                if self.running:
                    for job_id in self.store.cancel_requests(self.instance):
                        self.stop_if_running(job_id, "Job canceled", cause="cancel")
                self.watch.recheck()
            except StoreError:
                pass  # told by the store's own event; tried again at the next beat
            except Exception:
                traceback.print_exc()

    def _lease_watchdog(self) -> None:
        """Stop this instance's jobs before its lease runs out when it could not renew it: a thread of its
        own, which never waits for the store, so that a store that hangs cannot delay it."""
        while not self.stopped.wait(min(0.25, self.settings.lease / 20)):
            unrenewed = time.monotonic() - self.lease_renewed
            if unrenewed > self.settings.lease * 0.75 and not self.lease_lapsing:
                self.lease_lapsing = True
                self.stop_all(f"The instance running the job could not renew its lease in the job store for "
                              f"{unrenewed:.1f} s; the job was stopped before the lease ran out",
                              cause="lease")
                event(logging.ERROR, "instance.lease_lapsing", "lease not renewed: jobs stopped",
                      instance=self.instance, seconds=round(unrenewed, 1), jobs=len(self.running))

    def renew_lease(self) -> None:
        """Renew the lease; when it has run out (this instance was paused or cut off for longer than the
        lease, and others may have ended its jobs), stop its jobs and start again as a new instance."""
        asked_at = time.monotonic()
        renewed = self.store.renew_lease(self.instance, self.settings.lease)
        if renewed:
            self.lease_renewed, self.lease_lapsing = asked_at, False
            return
        old = self.instance
        self.stop_all("The instance running the job lost its lease; the job was stopped", cause="lease")
        self.instance = new_instance_id()
        self.store.register_instance(self.instance, self.settings.lease)
        self.lease_renewed, self.lease_lapsing = asked_at, False
        event(logging.WARNING, "instance.lease_lost", "lease ran out; serving as a new instance", old=old,
              instance=self.instance)

    def end_orphaned_jobs(self) -> None:
        """End in Error the Executing jobs of instances whose lease ran out, killing their processes where
        they ran on this machine."""
        here, orphans = boot_id(), self.store.orphaned_jobs()
        local = [(job_id, owner, group) for job_id, owner, group, owner_boot in orphans if owner_boot in (here, None)]
        if local:
            def kill() -> None:
                kill_processes_of({(job_id, owner) for job_id, owner, _ in local if owner})
                for job_id, _, group in local:
                    if group:
                        kill_noted_group(group, job_id)

            # Reading a process's environment waits for a process stuck in the kernel: the lease must not.
            killing = BackgroundCall(kill, "kill-orphans")
            if killing.done.wait(self.settings.lease / 10) and killing.error is not None:
                traceback.print_exception(killing.error)
        for job_id, owner, _, _ in orphans:
            message = (f"The server stopped while the job ran (instance {owner} stopped renewing its lease);"
                       f" the job was ended")
            if ended := self.store.end_orphaned_job(job_id, owner, message):
                self.ended_elsewhere(job_id, *ended, reason="its instance stopped", instance=owner)
        self.store.forget_instances(older_than=86400)
        self.store.forget_process_groups()

    def end_lost_claims(self) -> None:
        """End in Error the jobs this instance claimed but does not run: a claim committed while its answer
        was lost (the database connection broke during the commit). A claim younger than a few seconds may
        still be on its way to its worker, so only older ones count."""
        running = set(self.running)
        for job_id in self.store.owned_jobs(self.instance, older_than=10):
            if job_id not in running and (ended := self.store.end_orphaned_job(
                    job_id, self.instance, "The job was claimed but never started (the answer to its claim"
                                           " was lost); it was ended")):
                self.ended_elsewhere(job_id, *ended, reason="claim lost")

    def ended_elsewhere(self, job_id: int, template: str, duration: float, **why) -> None:
        """Tell the operator, and count, a job ended in Error here that no worker of this instance ran."""
        self.metrics.job_finished(template, ERROR, duration)
        event(logging.WARNING, "job.finished", "job finished", token=job_id, template=template, status=ERROR,
              duration=round(duration, 3), **why)

    # Shutdown.

    def stop_all(self, reason: str, cause: str) -> None:
        for execution in list(self.running.values()):
            execution.request_stop(reason, graceful=False, cause=cause)

    def shutdown(self, grace: float) -> None:
        """Stop claiming, answer waits, give running jobs `grace` seconds, then kill them; Pending jobs stay
        Pending, for this instance's next start or for the others."""
        with self.lock:  # a job a trigger claims now is handed over, and run, before the workers stop
            self.accepting = False
            while self.reserved:
                self.lock.wait(0.1)
        self.stopping.set()
        self.watch.close()
        with self.lock:
            self.lock.notify_all()
        # Each worker stops once it has run what it claimed (a job claimed just before, not yet in `running`,
        # or with its last job's end), so the grace waits for the workers, not for `running` to be empty.
        workers = [thread for thread in self.threads if thread.name.startswith("job-worker")]
        deadline = time.monotonic() + grace
        while (any(thread.is_alive() for thread in workers) and time.monotonic() < deadline
               and not self.hurry.is_set()):
            time.sleep(0.05)
        self.stop_all("Server stopped while the job ran; it was killed", cause="shutdown")
        for thread in workers:
            thread.join(timeout=10)
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=10)
        if not self.running:
            try:
                self.store.end_lease(self.instance)
            except StoreError:
                pass  # the lease runs out by itself


def new_instance_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Maintenance:
    """Background upkeep: reloads templates.toml when it changes, and prunes old finished jobs."""

    def __init__(self, store: JobStore, catalog: TemplateCatalog, keep_days: float,
                 stopping: threading.Event):
        self.store, self.catalog, self.keep_days, self.stopping = store, catalog, keep_days, stopping
        self.prune_every = min(3600.0, max(1.0, keep_days * 86400 / 4))

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        next_prune = 0.0
        while not self.stopping.wait(1.0 if next_prune else 0):
            try:
                self.catalog.reload_if_changed()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.prune_every
                    deleted = self.store.prune_finished(self.keep_days, self.stopping)
                    if deleted:
                        event(logging.INFO, "jobs.pruned", "pruned finished jobs", count=deleted,
                              older_than_days=self.keep_days)
            except StoreError:
                pass  # the store's own event tells the operator; tried again later
            except Exception as error:
                event(logging.ERROR, "maintenance.failed", "maintenance failed, will try again",
                      reason=repr(error))

#
# Request guard: the rules every request passes before its view runs, for the sake of browsers.
#
# Any web page a user visits can make their browser send requests here, so the guard checks three things,
# in this order: the Host header (a DNS-rebinding page reaches 127.0.0.1 under a name of its own), where a
# browser says a request comes from (Fetch Metadata, then Origin, then Referer: a request from another site
# may not change anything, nor read anything but by a top-level navigation), and, in the views, the wrong
# keys an address has tried. A request with none of those browser headers (curl, scripts, other tools) passes
# the cross-site rule as it always did.
#


def split_host(value: str) -> tuple[str, str] | None:
    """(name, port) of a Host header, the name in lower case without a trailing dot; None when malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if (port and not (port.isascii() and port.isdigit() and int(port) <= 65535)) or not name:
        return None
    return name.lower().removesuffix("."), port


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RateLimitedLog:
    """Logs an event at most once a minute per key (an origin, a host name), remembering a bounded number."""

    def __init__(self, every: float = 60.0, capacity: int = 1024):
        self.every, self.capacity = every, capacity
        self.last: OrderedDict[str, float] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, key: str, level: int, name: str, message: str, **fields) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(key, float("-inf")) < self.every:
                return
            self.last[key] = now
            self.last.move_to_end(key)
            while len(self.last) > self.capacity:
                self.last.popitem(last=False)
        event(level, name, message, **fields)


class KeyThrottle:
    """Counts wrong keys per client address over a sliding minute. An address with more than `limit` in the
    last minute is refused (429) until the oldest of them is a minute old. At most `capacity` addresses are
    remembered (the least recent are forgotten first), so a flood from many addresses cannot grow it."""

    def __init__(self, limit: int = DEFAULTS.key_failures, window: float = 60.0, capacity: int = 4096):
        self.limit, self.window, self.capacity = limit, window, capacity
        self.failures: OrderedDict[str, list[float]] = OrderedDict()
        self.lock = threading.Lock()

    def retry_after(self, address: str) -> int:
        """Seconds this address must wait before its next keyed request, 0 when it need not."""
        with self.lock:
            times = self.failures.get(address)
            if not times or len(times) <= self.limit:
                return 0
            wait = times[0] + self.window - time.monotonic()
            return max(1, int(wait + 0.999)) if wait > 0 else 0

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self.lock:
            times = self.failures.pop(address, [])
            times = [t for t in times if now - t < self.window][-self.limit:] + [now]
            self.failures[address] = times  # now the most recent address
            while len(self.failures) > self.capacity:
                self.failures.popitem(last=False)


class RequestGuard:
    """The Host rule, the cross-site rule and the key throttle, and the headers every response carries."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.metrics = metrics
        self.any_host = "*" in settings.allowed_hosts
        names = [name.lower().removesuffix(".") for name in settings.allowed_hosts if name != "*"]
        self.host_names = {name for name in names if not name.startswith(".")} | {
            name.lower().removesuffix(".") for name in settings.public_names}
        self.host_suffixes = tuple(name for name in names if name.startswith("."))
        self.origins = frozenset(origin.lower() for origin in settings.allow_origins)
        self.throttle = KeyThrottle(settings.key_failures)
        self.refusals = RateLimitedLog()

    # Before the view.

    def check(self, changes_state: bool) -> None:
        """Refuse (ApiError) a request that breaks the Host or the cross-site rule."""
        own = self.checked_host()
        if problem := self.cross_site_problem(own, changes_state):
            self.refuse("cross-site", request.headers.get("Origin") or "no-origin", problem)

    def checked_host(self) -> str:
        """The request's Host (name[:port], in lower case), once it is admitted."""
        raw = request.environ.get("HTTP_HOST", "")
        if not raw.strip():
            raise ApiError("Missing Host header", 400)
        if "," in raw:  # waitress joins a repeated header's values with ", "
            raise ApiError("Repeated Host header", 400)
        parts = split_host(raw.strip())
        if parts is None:
            raise ApiError("Malformed Host header", 400)
        name, port = parts
        if not (self.any_host or self.host_allowed(name)):
            self.refuse("host", name, f"Host name {shown(name)} is not allowed"
                                      " (a DNS rebinding attack looks like this):"
                                      " start app.py with --allowed-host NAME to serve a name of yours")
        return authority(name, port)

    def host_allowed(self, name: str) -> bool:
        if name == "localhost" or name.endswith(".localhost") or name in self.host_names:
            return True
        if is_ip_literal(name):  # IPv4 in dotted-quad form, or IPv6 (split_host took its brackets off)
            return True
        return any(name == suffix[1:] or name.endswith(suffix) for suffix in self.host_suffixes)

    def cross_site_problem(self, own: str, changes_state: bool) -> str | None:
        """Why a browser's request from another site is refused, or None. A request that changes nothing may
        come from elsewhere as a top-level navigation (the user sees the answer; the other site does not)."""
        headers = request.headers
        origin = headers.get("Origin")
        if origin is not None and origin.lower() in self.origins:
            return None
        mode, destination = headers.get("Sec-Fetch-Mode"), headers.get("Sec-Fetch-Dest")
        if not changes_state and mode == "navigate" and destination in (None, "document"):
            # Another site may send the user here, but not spend their address's wrong keys (authorize).
            request.environ["jobserver.from_elsewhere"] = headers.get("Sec-Fetch-Site") not in (
                None, "same-origin", "none")
            return None
        site = headers.get("Sec-Fetch-Site")
        what = "changes" if changes_state else "reads"
        advice = "start app.py with --allow-origin ORIGIN to admit a page of yours that posts here"
        if site is not None:
            if site in ("same-origin", "none"):
                return None
            return f"Cross-site request refused: a page of another site ({site}) {what} jobs here; {advice}"
        if origin is not None:
            if origin != "null" and origin_authority(origin) == own:
                return None
            return f"Cross-origin request refused: a page of {shown(origin)} {what} jobs here; {advice}"
        referer = headers.get("Referer")
        if referer:
            referer_origin = origin_of(referer)
            if referer_origin.lower() in self.origins or origin_authority(referer_origin) == own:
                return None
            return (f"Cross-origin request refused: a page of {shown(referer_origin)} {what} jobs here;"
                    f" {advice}")
        return None

    def refuse(self, rule: str, key: str, message: str) -> None:
        self.metrics.refused.labels(rule).inc()
        self.refusals(f"{rule} {key}", logging.WARNING, "request.refused", "request refused", rule=rule,
                      source=key[:100], path=request.path[:100], client=request.remote_addr)
        raise ApiError(message, 403)

    # In the views.

    def authorize(self, given: str | None, digest: str) -> None:
        """Check a key against a template's (or job's) key digest: KeyRefused when it is missing or wrong, 429
        while the client's address has tried too many wrong keys (even with the right one now)."""
        if not digest:
            return
        address = throttled_address(request.remote_addr or "-")
        if wait := self.throttle.retry_after(address):
            self.metrics.refused.labels("key-throttle").inc()
            self.refusals(f"throttle {address}", logging.WARNING, "request.refused", "request refused",
                          rule="key-throttle", client=address)
            raise ApiError(f"Too many wrong keys from this address; try again in {wait} s", 429,
                           {"Retry-After": str(wait)})
        if problem := key_problem(given, digest):
            # A navigation that another site started shows the user the refusal and tells that site nothing,
            # so its wrong keys are no guesses: counting them would let any page lock the user out.
            if given and not request.environ.get("jobserver.from_elsewhere"):
                self.throttle.failed(address)
            raise KeyRefused(problem)

    # After the view.

    @staticmethod
    def secure(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        for name in [name for name in response.headers.keys() if name.lower().startswith("access-control-")]:
            del response.headers[name]
        return response


def throttled_address(address: str) -> str:
    """The address the key throttle counts for a client: every loopback address is one (127.0.0.2 is as near
    as 127.0.0.1), and an IPv6 client counts by its /64, which one host is usually given whole."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.is_loopback:
        return "loopback"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL (a Referer), without its path and query."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.scheme and parts.netloc else "null"


def origin_authority(origin: str) -> str | None:
    """The host[:port] of an origin, as a Host header names it (lower case), or None."""
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    split = split_host(parts.netloc.rpartition("@")[2])
    if split is None:
        return None
    return authority(*split)


def authority(name: str, port: str) -> str:
    """host[:port] as a Host header writes it, an IPv6 address in brackets, without the default ports (80,
    443) that browsers leave out of an Origin and some clients put in a Host header."""
    name = f"[{name}]" if ":" in name else name
    return f"{name}:{port}" if port and port not in ("80", "443") else name


def origin_problem(origin: str) -> str | None:
    """Why an --allow-origin value is not an exact origin (scheme://host[:port]), or None."""
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc \
            or origin != f"{parts.scheme}://{parts.netloc}":
        return "must be an origin: scheme://host[:port], with no path, such as https://intranet.example"
    if split_host(parts.netloc) is None or "@" in parts.netloc:
        return "has a malformed host or port"
    return None


#
# Request parameters: the query string and the body, checked once.
#


class RequestParameters:
    """The query string and form, JSON or empty body of a request, checked once: API parameters by
    lower-case name, every other parameter as a (name, value) variable, and the key from its three sources."""

    def __init__(self, pairs: list[tuple[str, str]], api_names: tuple[str, ...], header_key: str | None,
                 body_key: str | None):
        self.api: dict[str, str] = {}
        self.variables: list[tuple[str, str]] = []
        seen = set()
        for name, value in pairs:
            folded = name.removeprefix("$").lower()
            if folded in seen:
                raise ApiError(f"Parameter {shown(name)} is given more than once")
            seen.add(folded)
            check_value(name, value)
            if name.lower() in api_names:
                self.api[name.lower()] = value
            else:
                self.variables.append((name, value))
        self.key = self.api.get("key") or header_key or body_key or None

    @classmethod
    def from_request(cls, api_names: tuple[str, ...]) -> RequestParameters:
        pairs = parse_urlencoded(request.query_string, "query string")
        body_key = None
        body = request.get_data(cache=False)
        if body:
            mimetype = request.mimetype
            if mimetype in ("", "application/x-www-form-urlencoded"):
                pairs += parse_urlencoded(body, "request body")
            elif mimetype == "application/json":
                body_pairs, body_key = parse_json_object(body)
                pairs += body_pairs
            else:
                raise ApiError(f"Unsupported Content-Type {shown(mimetype)}: send "
                               "application/x-www-form-urlencoded or application/json", 415)
        return cls(pairs, api_names, header_text(request.headers.get("X-ApiKey")), body_key)

    def number(self, name: str, kind=float, maximum=None):
        """An optional numeric parameter (None when absent), clamped to maximum."""
        text = self.extra(name)
        if text is None:
            return None
        pattern = r"[0-9]{1,18}" if kind is int else r"[0-9]{1,18}(\.[0-9]{1,9})?"
        if not re.fullmatch(pattern, text):
            unit = "a whole number" if kind is int else "a number of seconds"
            raise ApiError(f"Parameter {name} must be {unit}, 0 or more")
        value = kind(text)
        return min(value, maximum) if maximum is not None else value

    def extra(self, name: str) -> str | None:
        """An extension parameter (offset, wait) of the endpoints that have no variables."""
        for variable_name, value in self.variables:
            if variable_name.lower() == name:
                return value
        return None


def header_text(value: str | None) -> str | None:
    """A header's value as the text the client sent: UTF-8, or else Latin-1 (HTTP's historical charset, and
    how WSGI hands every header over)."""
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def parse_urlencoded(raw: bytes, where: str) -> list[tuple[str, str]]:
    try:
        return urllib.parse.parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, errors="strict", max_num_fields=MAX_PARAMETERS
        )
    except UnicodeDecodeError:
        raise ApiError(f"The {where} is not valid UTF-8") from None
    except ValueError:
        raise ApiError(f"The {where} has more than {MAX_PARAMETERS} parameters") from None


class JsonMembers(list):
    """A JSON object's (name, value) members in order, duplicates kept."""


def parse_json_object(body: bytes) -> tuple[list[tuple[str, str]], str | None]:
    """A JSON object body: API_Key is the key, every other member a parameter with a scalar value."""
    try:  # objects as JsonMembers lists, so that a name given twice is seen, as in a form
        data = json.loads(body, object_pairs_hook=JsonMembers)
    except ValueError:
        raise ApiError("The request body is not valid JSON") from None
    except RecursionError:
        raise ApiError("The request body is JSON nested too deeply to be a list of parameters") from None
    if not isinstance(data, JsonMembers):
        raise ApiError("A JSON request body must be an object")
    if len(data) > MAX_PARAMETERS:
        raise ApiError(f"The request body has more than {MAX_PARAMETERS} parameters")
    pairs, key = [], None
    for name, value in data:
        text = scalar_text(value)
        if text is None:
            raise ApiError(f"JSON member {shown(name)} must be a string, number or boolean")
        if name.lower() == "api_key":
            if key is not None:
                raise ApiError("JSON member API_Key is given more than once")
            key = text
        else:
            pairs.append((name, text))
    return pairs, key


def check_value(name: str, value: str) -> None:
    try:
        problem = value_problem(value)
    except UnicodeEncodeError:
        raise ApiError(f"Parameter {shown(name)} is not valid UTF-8 text") from None
    if problem:
        raise ApiError(f"Parameter {shown(name)} {problem}")




#
# API views: the Otter endpoints and their extensions.
#


@dataclasses.dataclass
class Services:
    """What the views need, found in app.extensions["jobserver"]."""

    settings: Settings
    store: JobStore
    catalog: TemplateCatalog
    watch: JobWatch
    runner: JobRunner
    metrics: Metrics
    guard: RequestGuard
    maintenance: Maintenance
    page_secret: bytes  # signs the page's forms; shared by every instance through the store


def services() -> Services:
    return current_app.extensions["jobserver"]


def changes_state(view):
    """Mark a view that changes jobs whatever its method:
    a browser may send it only from this server's pages."""
    view.changes_state = True
    return view


def text_response(body, status: int = 200, headers: dict | None = None) -> Response:
    return Response(body, status=status, headers=headers, mimetype="text/plain")


def trigger_job(template: JobTemplate, variables: dict[str, str], via: str) -> int:
    """Commit a job of the template (whose key and variables were checked) and tell the operator."""
    site = services()
    token = site.runner.submit(template, variables)
    site.metrics.job_triggered(template.name, via)
    event(logging.INFO, "job.triggered", "job triggered", token=token, template=template.name,
          client=request.remote_addr, via=via)
    return token


def find_job(params: RequestParameters) -> JobRecord:
    """The job a status, logs or cancel request names, once its key is checked."""
    token = params.api.get("token")
    if not token:
        raise ApiError("Missing parameter: token")
    job_id = parse_token(token)
    site = services()
    # A job running here is known without a read: a client that triggers and then waits, on one instance,
    # waits one statement less, which on PostgreSQL is a round trip.
    job = site.runner.running_job(job_id) or site.store.get_job(job_id)
    if job is None:
        raise ApiError(f"No job has the token {job_id}")
    site.guard.authorize(params.key, job.key_digest)
    return job


def parse_token(token: str) -> int:
    if not (token.isascii() and token.isdigit() and len(token) <= 18):
        raise ApiError("Invalid token: a job token is a whole number")
    return int(token)


api = Blueprint("api", __name__)


@api.route("/api/jobs/trigger", methods=["GET", "POST"])
@changes_state
def trigger():
    params = RequestParameters.from_request(TRIGGER_PARAMETERS)
    name = params.api.get("template")
    if not name:
        raise ApiError("Missing parameter: template")
    template = services().catalog.get(name)
    if template is None:
        raise ApiError(f"No template named {shown(name)}", 404)
    if not template.api:
        raise ApiError(f"Template {template.name} does not allow API use", 403)
    services().guard.authorize(params.key, template.key_digest)
    variables = resolve_variables(template, params.variables)
    return text_response(str(trigger_job(template, variables, via="api")))


@api.route("/api/jobs/status", methods=["GET", "POST"])
def status():
    params = RequestParameters.from_request(JOB_PARAMETERS)
    job = find_job(params)
    wait = params.number("wait", float, MAX_WAIT_SECONDS)
    progress = Progress(job.status, job.log_count)
    if wait:
        progress = services().watch.wait(job.id, progress, lambda now: now.status in FINAL_STATUSES, wait)
    return text_response(progress.status)


@api.route("/api/jobs/logs", methods=["GET", "POST"])
def logs():
    params = RequestParameters.from_request(JOB_PARAMETERS)
    job = find_job(params)
    offset = params.number("offset", int) or 0
    wait = params.number("wait", float, MAX_WAIT_SECONDS)
    progress = Progress(job.status, job.log_count)
    if wait:
        progress = services().watch.wait(
            job.id, progress, lambda now: now.count > offset or now.status in FINAL_STATUSES, wait)
    complete = progress.status in FINAL_STATUSES
    headers = {"X-Log-Offset": str(max(progress.count, offset)), "X-Job-Complete": str(complete).lower()}
    return text_response(services().store.read_logs(job.id, offset, progress.count), headers=headers)


@api.route("/api/jobs/cancel", methods=["GET", "POST"])
@changes_state
def cancel():
    job = find_job(RequestParameters.from_request(JOB_PARAMETERS))
    return text_response(services().runner.cancel(job.id))


@api.route("/api/templates", methods=["GET", "POST"])
def templates():
    summaries = [template_summary(t) for t in services().catalog.api_templates()]
    return Response(json.dumps(summaries, indent=2) + "\n", mimetype="application/json")


@api.route("/healthz")
def healthz():
    """200 ok when the store answers a read, its last write did not fail and the workers run; else 503 and
    why. Reads only: a load balancer may ask often."""
    site = services()
    problem = None
    if not site.runner.accepting:
        problem = "shutting down"
    elif not site.runner.alive():
        problem = "the job workers have stopped"
    else:
        problem = site.store.health_problem()
    if problem:
        return text_response(problem, 503, {"Retry-After": "5"})
    return text_response("ok")


@api.route("/metrics")
def metrics():
    body, content_type = services().metrics.exposition()
    return Response(body, content_type=content_type)

#
# Web pages: the jobs, one job with its live log, and a form per template, for people with a browser.
#
# Server-rendered HTML (Flask's autoescaping Jinja templates in web/), readable with JavaScript off; one small
# same-origin script (web/static/page.js) adds live updates by polling /jobs/<token>/updates, which holds no
# thread between polls. A keyed template's jobs show only their token, template and time until the browser
# gives the key: the script keeps it in the tab's sessionStorage and sends it as X-ApiKey, never in a URL, a
# cookie or the HTML; without the script, forms post it.
#

pages = Blueprint("pages", __name__)

PAGE_SIZE = 50  # jobs on a page of the list
TAIL_ENTRIES = 200  # log entries a job page shows at first; earlier ones load on demand
UPDATE_ENTRIES = 500  # log entries in one live update
PAGE_TOKEN_SECONDS = 86400  # how long a form of the page may be posted back
PAGE_SECURITY = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self';"
                               " frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FORM_FIELDS = ("page-token", "key", "new-name", "new-value")  # the form's own fields: none is a variable name


@pages.after_request
def page_headers(response: Response) -> Response:
    for name, value in PAGE_SECURITY.items():
        response.headers.setdefault(name, value)
    return response


def page(html: str, status: int = 200, **context) -> Response:
    """A page rendered from web/<html>, with the page's headers (PAGE_SECURITY, set by page_headers)."""
    return Response(render_template(html, **context), status=status, mimetype="text/html")


def not_found_page(what: str = "There is no page at this address."):
    response = page("not_found.html", 404, message=what)
    for name, value in PAGE_SECURITY.items():
        response.headers[name] = value
    return response


def page_token() -> str:
    """A token of the page's own for its forms: a time and its signature by the secret all instances share.
    Another site cannot read it (the same-origin policy), so a form that carries it came from these pages."""
    stamp = str(int(time.time()))
    return f"{stamp}.{page_signature(stamp)}"


def page_signature(stamp: str) -> str:
    return hmac.new(services().page_secret, stamp.encode(), hashlib.sha256).hexdigest()[:32]


def page_token_problem(token: str | None) -> str | None:
    stamp, _, signature = (token or "").partition(".")
    if not (stamp.isdigit() and hmac.compare_digest(signature, page_signature(stamp))):
        return "This form did not come from this server's pages: reload the page and send it again"
    if time.time() - int(stamp) > PAGE_TOKEN_SECONDS:
        return "This form has expired: reload the page and send it again"
    return None


class PageForm:
    """A form posted by the pages: its fields checked like any request's (UTF-8, no NUL, sizes), the page's
    token checked, the key and added name/value rows apart from the template's variables."""

    def __init__(self):
        pairs = parse_urlencoded(request.get_data(cache=False), "form") if request.content_length else []
        self.fields: dict[str, list[str]] = {}
        self.problems: dict[str, str] = {}  # by field: a value that breaks a request's limits, not kept
        for name, value in pairs:
            try:
                check_value(name, value)
            except ApiError as error:
                self.problems.setdefault(name, error.message)
                continue
            self.fields.setdefault(name, []).append(value)
        if problem := page_token_problem(self.one("page-token")):
            raise ApiError(problem, 403)
        self.key = self.one("key")

    def one(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def variables(self) -> list[tuple[str, str]]:
        """The variables given: declared fields left empty keep their default; rows of new names follow."""
        given = [(name, values[-1]) for name, values in self.fields.items()
                 if name not in FORM_FIELDS and values[-1] != ""]
        new = zip(self.fields.get("new-name", []), self.fields.get("new-value", []))
        return given + [(name.strip(), value) for name, value in new if name.strip()]


def job_or_404(token: str) -> JobDetail:
    if not (token.isascii() and token.isdigit() and len(token) <= 18):
        raise NotFound()
    job = services().store.job_detail(int(token))
    if job is None:
        raise NotFound()
    return job


def template_or_404(name: str) -> JobTemplate:
    template = services().catalog.get(name)
    if template is None or not template.api:
        raise NotFound()
    return template


def timing(job) -> dict:
    """The times a page shows, as seconds since the epoch (the script shows them in the browser's zone)."""
    created, started, finished = job[0], job[1], job[2]
    return {"created": created, "started": started, "finished": finished, "duration": ran_for(started, finished)}


def ran_for(started: float | None, finished: float | None) -> float | None:
    """How long a job ran, or has been running; None before it started."""
    if started is None:
        return None
    return max(0.0, (finished if finished is not None else time.time()) - started)


@pages.app_template_filter("utc")
def utc_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


@pages.app_template_filter("iso")
def iso_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@pages.app_template_filter("duration")
def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


@pages.route("/")
def job_list():
    site = services()
    template = request.args.get("template") or None
    status = request.args.get("status") or None
    before = request.args.get("before") or None
    if status is not None and status not in STATUSES:
        raise ApiError(f"Unknown status {shown(status)}: one of {', '.join(STATUSES)}", 400)
    if before is not None and not (before.isascii() and before.isdigit() and len(before) <= 18):
        raise ApiError("before must be a job token", 400)
    if template is not None and (known := site.catalog.get(template)) is not None:
        template = known.name
    rows = site.store.list_jobs(template, status, int(before) if before else None, PAGE_SIZE + 1)
    jobs = [job_row(*row) for row in rows[:PAGE_SIZE]]
    older = rows[PAGE_SIZE - 1][0] if len(rows) > PAGE_SIZE else None
    runnable = sorted(site.catalog.api_templates(), key=lambda t: t.name.lower())
    return page("jobs.html", jobs=jobs, older=older, filters={"template": template, "status": status},
                templates=runnable, statuses=STATUSES, newest=before is not None)


def job_row(token: int, template: str, status: str, keyed: bool, created: float, started: float | None,
            finished: float | None) -> Markup:
    """One row of the list; a keyed template's job shows only its token, template and trigger time. The list
    shows 50 and must answer about as fast as a status request, which a Jinja loop over 50 rows of 8 fields
    did not, so the row is made here: the template's name, the one text from outside, is escaped as the page
    templates' autoescape does; the rest is digits, times and status words."""
    iso = iso_text(created)
    duration = "" if keyed else duration_text(ran_for(started, finished))
    word, style = ("key needed", "locked") if keyed else (status, status.lower())
    return Markup(f'<tr><td><a href="/jobs/{token:d}">{token:d}</a></td><td>{escape(template)}</td>'
                  f'<td><span class="status status-{style}">{word}</span></td><td><time datetime="{iso}">'
                  f'{iso[:10]} {iso[11:19]} UTC</time></td><td>{duration}</td></tr>')


def job_page(job: JobDetail, unlocked: bool, status: int = 200, problem: str | None = None) -> Response:
    site = services()
    template = site.catalog.get(job.template)
    first = max(0, job.log_count - TAIL_ENTRIES) if unlocked else 0  # a locked page tells nothing of the log
    entries = [(level.lower(), level, message) for _, level, message in
               (site.store.log_tail(job.id, first, job.log_count) if unlocked else [])]
    variables = [{"name": name, "value": value, "secret": value is None}
                 for name, value in job.variables.items()]
    again = None
    if template is not None and template.api:
        again = template_url(template.name, {v["name"]: v["value"] for v in variables if not v["secret"]})
    return page("job.html", status, job=job, unlocked=unlocked, keyed=bool(job.key_digest), entries=entries,
                first=first, variables=variables, again=again, times=timing((job.created_at, job.started_at,
                                                                              job.finished_at)),
                final=job.status in FINAL_STATUSES, problem=problem, token=page_token(),
                runnable=template is not None and template.api)


@pages.route("/jobs/<token>", methods=["GET", "POST"])
def job_view(token: str):
    """A job's page. A keyed template's job is shown whole only with its key: posted by the key form, when
    JavaScript is off (with it, the script asks /updates with the key instead)."""
    job = job_or_404(token)
    if not job.key_digest:
        return job_page(job, unlocked=True)
    if request.method == "GET":
        return job_page(job, unlocked=False, status=403)
    form = PageForm()
    if refusal := page_key_refusal(form.key, job):
        return refusal
    return job_page(job, unlocked=True)


def page_key_refusal(key: str | None, job: JobDetail) -> Response | None:
    """The locked job page with why a key was refused (wrong, or the throttle's 429), or None when it opens
    the job."""
    try:
        services().guard.authorize(key, job.key_digest)
    except KeyRefused as error:
        return job_page(job, unlocked=False, status=403, problem=error.message)
    except ApiError as error:
        response = job_page(job, unlocked=False, status=error.status, problem=error.message)
        response.headers.update(error.headers)
        return response
    return None


@pages.route("/jobs/<token>/updates")
def job_updates(token: str):
    """What the job page's script polls: the job's state and the entries after `offset` (or before `before`),
    as JSON; the key, for a keyed template, as an X-ApiKey header."""
    job = job_or_404(token)
    site = services()
    site.guard.authorize(header_text(request.headers.get("X-ApiKey")), job.key_digest)
    count = job.log_count
    if "before" in request.args:
        end = min(count, int_argument("before"))
        start = max(0, end - UPDATE_ENTRIES)
    else:
        start = min(count, int_argument("offset"))
        end = min(count, start + UPDATE_ENTRIES)
    entries = site.store.log_tail(job.id, start, end) if end > start else []
    body = {"status": job.status, "final": job.status in FINAL_STATUSES, "count": count, "offset": end,
            "times": timing((job.created_at, job.started_at, job.finished_at)),
            "variables": [{"name": name, "value": value, "secret": value is None}
                          for name, value in job.variables.items()],
            "entries": [[seq, level, message] for seq, level, message in entries]}
    return Response(json.dumps(body), mimetype="application/json")


def int_argument(name: str) -> int:
    text = request.args.get(name, "0")
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise ApiError(f"Parameter {name} must be a whole number, 0 or more")
    return int(text)


@pages.route("/jobs/<token>/cancel", methods=["POST"])
def cancel_from_page(token: str):
    job = job_or_404(token)
    form = PageForm()
    if refusal := page_key_refusal(form.key, job):
        return refusal
    services().runner.cancel(job.id)
    return redirect(url_for("pages.job_view", token=job.id), 303)


def template_url(name: str, values: dict[str, str] | None = None) -> str:
    """/templates/NAME, with values for the form in the query string: built here, not by url_for, whose own
    keyword arguments (endpoint, _anchor, _method...) a variable of that name would become."""
    query = f"?{urllib.parse.urlencode(values)}" if values else ""
    return f"/templates/{urllib.parse.quote(name, safe='')}{query}"


@pages.app_template_global("template_url")
def template_link(name: str) -> str:
    return template_url(name)


@pages.route("/templates/<path:name>", methods=["GET", "POST"])
def template_form(name: str):
    """A template's form: one input per declared variable, filled with the query's values (Run again) or the
    defaults. Posting it triggers a job like the API does and goes to the job's page; a refused value is shown
    next to its field, the other values kept (never a secret's, nor the key)."""
    template = template_or_404(name)
    if request.method == "GET":
        values = {variable.name: request.args.get(variable.name, variable.default)
                  for variable in template.variables.values() if not variable.secret}
        if template.allow_new_variables:  # Run again of a job with variables of its own
            values.update((name, value) for name, value in request.args.items(multi=False)
                          if name.lower() not in template.variables and not variable_name_problem(name))
        return form_page(template, values)
    form = PageForm()
    given = form.variables()
    secret = {variable.name.lower() for variable in template.variables.values() if variable.secret}
    kept = {name: value for name, value in given if name.removeprefix("$").lower() not in secret}
    if form.problems:
        return form_page(template, kept, 400, form.problems)
    try:
        services().guard.authorize(form.key, template.key_digest)
        variables = resolve_variables(template, given)
        token = trigger_job(template, variables, via="page")
    except KeyRefused as error:
        return form_page(template, kept, 403, {"key": error.message})
    except ApiError as error:  # the key throttle's 429: said next to the key, the values kept
        response = form_page(template, kept, error.status, {"key": error.message})
        response.headers.update(error.headers)
        return response
    except BadValue as error:
        return form_page(template, kept, 400, {error.field or "": error.message})
    except NotAccepting as error:
        return form_page(template, kept, 503, {"": error.message})
    return redirect(url_for("pages.job_view", token=token), 303)


def form_page(template: JobTemplate, values: dict[str, str], status: int = 200,
              problems: dict[str, str] | None = None) -> Response:
    """The form, with each problem next to its field; one of an added row (or of no field) above the form."""
    declared = {variable.name.lower() for variable in template.variables.values()}
    extra = [(name, value) for name, value in values.items() if name.lower() not in declared]
    problems = {name.lower(): message for name, message in (problems or {}).items()}
    general = [message for name, message in problems.items() if name not in declared and name != "key"]
    if general:
        problems[""] = " ".join(general)
    return page("template.html", status, template=template, values=values, extra=extra, problems=problems,
                token=page_token(), variables=list(template.variables.values()),
                patterns={v.name: html_pattern(v.pattern.pattern)
                          for v in template.variables.values() if v.pattern})


# What a browser's pattern attribute (compiled with the `v` flag) lets a backslash escape: outside a character
# class the syntax characters and /, inside one those and the class punctuators too.
SYNTAX_ESCAPES = set(r"^$\.*+?()[]{}|/")
CLASS_ESCAPES = SYNTAX_ESCAPES | set("-&!#%,:;<=>@`~")


def html_pattern(pattern: str) -> str | None:
    """A template's (Python) pattern as a browser's pattern attribute takes it, or None when it uses syntax
    this does not translate: then the browser gives no hint, and the server enforces the pattern either
    way."""
    # \w, \d and \b are Unicode in Python and ASCII in a browser: such a hint would refuse values the server takes.
    if "(?" in pattern.replace("(?:", "") or re.search(r"\\[AZzGNpPxuU0-9wWdDbB]", pattern):
        return None
    out: list[str] = []
    in_class = False
    range_state = ""  # in a class: "open" after a range's -, "closed" after the atom that ends the range
    position = 0
    while position < len(pattern):
        char, following = pattern[position], pattern[position + 1:position + 2]
        if not in_class:
            if char == "\\" and following:
                out.append("\\" + following if following.isalnum() or following in SYNTAX_ESCAPES
                           else following)
                position += 2
                continue
            out.append(char)
            if char == "[":
                in_class, range_state = True, ""
                if following == "^":
                    out.append("^")
                    position += 1
        elif char == "]":
            in_class = False
            out.append("]")
        elif char == "-" and out[-1] not in ("[", "^") and following not in ("", "]") and range_state == "" \
                and not re.fullmatch(r"\\[dwsDWS]", out[-1]):
            out.append("-")  # a range, such as a-z
            range_state = "open"
        else:
            if char == "\\" and following:
                out.append("\\" + following if following.isalnum() or following in CLASS_ESCAPES
                           else following)
                position += 1
            else:
                out.append("\\" + char if char in CLASS_ESCAPES else char)
            range_state = "closed" if range_state == "open" else ""
        position += 1
    return None if in_class else "".join(out)


#
# Application: create_app wires the parts together; the guard and the error handlers wrap every view.
#


def create_app(config: dict | None = None) -> Flask:
    """The Flask application, its store, templates and runner (started) in app.extensions["jobserver"].
    config holds Settings fields as upper-case keys (DATABASE, TEMPLATES, WORKERS, ...)."""
    settings = Settings.from_config(config)
    app = Flask(__name__, template_folder=str(WEB_PATH), static_folder=str(WEB_PATH / "static"),
                static_url_path="/static")
    app.url_map.merge_slashes = False  # /api//jobs/trigger is a 404 like any unknown path, not a redirect
    app.url_map.strict_slashes = False
    app.config.update({field.name.upper(): getattr(settings, field.name)
                       for field in dataclasses.fields(settings)})
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body

    metrics = Metrics()
    store = open_store(settings.database, settings)
    try:
        catalog = TemplateCatalog(settings.templates, store)
        watch = JobWatch(store, settings.max_followers)
        runner = JobRunner(store, catalog, watch, metrics, settings)

        def on_store_event(happening: StoreEvent) -> None:
            if happening.progress is not None:
                watch.update(happening.job_id, happening.progress)
            runner.on_event(happening)

        store.listener = on_store_event
        runner.start()
    except BaseException:
        store.close()
        raise
    metrics.template_names = catalog.names
    metrics.observe_live(LiveFigures(store, runner, watch))
    maintenance = Maintenance(store, catalog, settings.keep_days, runner.stopping)
    maintenance.start()
    page_secret = store.setting("page_secret", lambda: secrets_module.token_hex(32)).encode()
    app.extensions["jobserver"] = Services(settings, store, catalog, watch, runner, metrics,
                                           RequestGuard(settings, metrics), maintenance, page_secret)
    app.register_blueprint(api)
    app.register_blueprint(pages)
    app.before_request(guard_request)
    app.after_request(finish_response)
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(Refused, refused)
    app.register_error_handler(StoreError, store_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    return app


def shutdown_app(app: Flask, grace: float) -> None:
    """Stop what create_app started: no new jobs, running ones get `grace` seconds, then the store closes."""
    site = app.extensions["jobserver"]
    site.runner.shutdown(grace)
    site.maintenance.thread.join(timeout=10)
    site.store.close()


def guard_request():
    # Flask would answer HEAD (and so trigger or cancel a job for a client that never sees the answer)
    # and OPTIONS on its own; the job endpoints take GET and POST only.
    view = current_app.view_functions.get(request.endpoint)
    state_changing = getattr(view, "changes_state", False) or (
        request.blueprint == "pages" and request.method not in ("GET", "HEAD"))
    services().guard.check(state_changing)
    if request.path.startswith("/api/") and request.method not in ("GET", "POST"):
        raise ApiError(f"Method {request.method} is not allowed here: use GET or POST",
                       405, {"Allow": "GET, POST"})


def finish_response(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    services().metrics.http_requests.labels(rule, str(response.status_code)).inc()
    if LOG.isEnabledFor(logging.DEBUG):  # the path only: a query or a form may hold a key or a secret
        event(logging.DEBUG, "http.request", "request answered", method=request.method, path=request.path,
              status=response.status_code, client=request.remote_addr)
    return RequestGuard.secure(response)


REFUSAL_STATUS = {BadValue: 400, KeyRefused: 403, NotAccepting: 503}


def api_error(error: ApiError):
    return text_response(error.message, error.status, error.headers)


def refused(error: Refused):
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return text_response(error.message, REFUSAL_STATUS.get(type(error), 400), headers)


def store_error(error: StoreError):
    return text_response(f"The job store is unavailable ({error}); try again later",
                         503, {"Retry-After": "5"})


def http_error(error: HTTPException):
    if error.code == 404 and not (request.path + "/").startswith("/api/"):
        return not_found_page()
    reasons = {
        404: "Not found: the endpoints are /api/jobs/trigger, /api/jobs/status, /api/jobs/logs,"
             " /api/jobs/cancel and /api/templates",
        413: f"The request body is larger than {current_app.config['MAX_BODY']} bytes",
    }
    headers = {name: value for name, value in error.get_headers() if name.lower() == "allow"}
    return text_response(reasons.get(error.code, f"{error.code} {error.name}"), error.code, headers)


def unexpected_error(error: Exception):
    traceback.print_exc()
    return text_response("Internal server error", 500)


#
# Command line.
#


class OneLineParser(argparse.ArgumentParser):
    """An option parser whose errors are one line on stderr (and exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"app.py: error: {message} (see app.py --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = OneLineParser(prog="app.py",
                           description="Serve Otter's Job Orchestration API for the jobs of a"
                                       " templates.toml.")
    option = parser.add_argument
    option("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    option("--port", type=port_number, default=8080, help="port, 0 for any free one (default: %(default)s)")
    option("--reuse-port", action="store_true",
           help="share the port with other instances on this host (SO_REUSEPORT):"
                " the kernel spreads connections")
    option("--templates", default=d.templates,
           help="job templates file (default: templates.toml beside app.py)")
    option("--db", default=os.environ.get("JOBSERVER_DB", d.database),
           help="a SQLite file, or a postgresql:// URL shared by several instances (default: $JOBSERVER_DB, "
                "else jobs.db beside app.py)")
    option("--workers", type=positive_int, default=d.workers, help="jobs run at once (default: %(default)s)")
    option("--http-threads", type=positive_int, default=d.http_threads,
           help="threads answering ordinary requests (default: %(default)s)")
    option("--max-followers", type=positive_int, default=d.max_followers,
           help="requests held by wait at once, a thread each; more are answered at once"
                " (default: %(default)s)")
    option("--max-connections", type=positive_int, default=d.max_connections,
           help="open HTTP connections (default: %(default)s)")
    option("--idle-timeout", type=positive_number, default=d.idle_timeout,
           help="seconds before a silent connection is closed (default: %(default)s)")
    option("--grace", type=non_negative_number, default=d.grace,
           help="seconds running jobs get to finish at shutdown (default: %(default)s)")
    option("--cancel-grace", type=non_negative_number, default=d.cancel_grace,
           help="seconds between SIGTERM and SIGKILL when a job is canceled (default: %(default)s)")
    option("--busy-timeout", type=positive_number, default=d.busy_timeout,
           help="seconds a write waits for the database before it fails with 503 (default: %(default)s)")
    option("--max-body", type=positive_int, default=d.max_body,
           help="largest request body in bytes (default: 1 MiB)")
    option("--max-pending", type=positive_int, default=d.max_pending,
           help="most Pending jobs before triggers get 503 (default: %(default)s)")
    option("--keep-days", type=positive_number, default=d.keep_days,
           help="days finished jobs and their logs are kept (default: %(default)s)")
    option("--lease", type=positive_number, default=d.lease,
           help="seconds of an instance's lease in the database (default: %(default)s)")
    option("--db-connections", type=positive_int, default=d.db_connections,
           help="PostgreSQL connections per instance (default: %(default)s)")
    option("--allowed-host", action="append", default=[], type=host_name, metavar="NAME",
           help="a Host name to serve besides IP addresses and localhost"
                " (.example.com: it and its subdomains; *: any); repeatable")
    option("--allow-origin", action="append", default=[], type=allowed_origin, metavar="ORIGIN",
           help="the origin (scheme://host[:port]) of another site's page that may post here; repeatable")
    option("--log-level", choices=("debug", "info", "warning"), default="info",
           help="which events go to stderr (default: %(default)s)")
    option("--log-format", choices=("text", "json"), default="text",
           help="events as text lines or JSON objects (default: %(default)s)")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 0 to 65535")
    return value


def positive_number(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def non_negative_number(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def host_name(text: str) -> str:
    if text == "*" or re.fullmatch(r"\.?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                                   r"[A-Za-z0-9])?)*\.?", text):
        return text
    raise argparse.ArgumentTypeError(f"{shown(text)} is not a host name (letters, digits, - and dots;"
                                     " a leading dot for subdomains; * for any)")


def allowed_origin(text: str) -> str:
    if problem := origin_problem(text):
        raise argparse.ArgumentTypeError(f"{shown(text)} {problem}")
    return text


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully; returns the exit code."""
    args = build_parser().parse_args(argv)
    if "*" in args.allowed_host:
        print("app.py: warning: --allowed-host '*' turns the Host check off: any web page that makes your"
              " browser send requests here under a name of its own (DNS rebinding) can run jobs",
              file=sys.stderr)
    # Listen and claim the database before create_app starts the runner: a second instance must fail
    # without ending the first one's running jobs as if they had been interrupted.
    try:
        listener = listen(args.host, args.port, args.reuse_port)
    except OSError as error:
        print(f"app.py: error: cannot listen on {args.host}:{args.port}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    host, port = listener.getsockname()[:2]
    settings = Settings(
        database=args.db, templates=args.templates, workers=args.workers, max_body=args.max_body,
        max_pending=args.max_pending, keep_days=args.keep_days, grace=args.grace,
        cancel_grace=args.cancel_grace, busy_timeout=args.busy_timeout, lease=args.lease,
        http_threads=args.http_threads, max_followers=args.max_followers,
        max_connections=args.max_connections, idle_timeout=args.idle_timeout,
        db_connections=args.db_connections, allowed_hosts=tuple(args.allowed_host),
        allow_origins=tuple(args.allow_origin), public_names=public_names(host))
    log_writer = configure_logging(args.log_level, args.log_format)
    claimed = None
    try:
        if not settings.database.startswith(("postgresql:", "postgres:")):
            claimed = claim_database(settings.database)
        app = create_app(dataclasses.asdict(settings))
    except (TemplateError, StoreError, OSError, ImportError, ValueError) as error:
        if claimed is not None:
            os.close(claimed)  # create_app closed the store it opened
        listener.close()
        log_writer.stop()
        print(f"app.py: error: {start_failure(error, settings.database)}", file=sys.stderr)
        return 2
    runner, catalog = app.extensions["jobserver"].runner, app.extensions["jobserver"].catalog
    server = serve(app, listener, settings)
    stop = threading.Event()

    def on_stop_signal(*_):
        if stop.is_set():  # a second Ctrl-C or SIGTERM: no more grace
            runner.hurry.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())  # a handler must not start threads or take locks
    threading.Thread(target=server.run, name="http", daemon=True).start()
    shown_host = f"[{host}]" if ":" in host else host
    print(f"Serving on http://{shown_host}:{port} (templates: {args.templates},"
          f" database: {redacted(args.db)}, instance: {runner.instance})", flush=True)
    while not stop.wait(0.2):
        if reload.is_set():
            reload.clear()
            catalog.reload_if_changed(force=True)
    event(logging.INFO, "server.stopping", "shutting down: new jobs are refused, running jobs get their grace"
          " (Ctrl-C again to kill them now)", grace=settings.grace, running=len(runner.running))
    shutdown_app(app, settings.grace)
    server.close()
    event(logging.INFO, "server.stopped", "stopped")
    log_writer.stop()
    return 0


def start_failure(error: Exception, database: str) -> str:
    """The one line that says why the server could not start."""
    if isinstance(error, TemplateError):
        return str(error)
    if isinstance(error, ImportError):
        return (f"{error}: a postgresql:// database needs psycopg 3"
                f" (python -m pip install -r requirements.txt)")
    return scrubbed(f"cannot use the database {database}: {error}", database)


def serve(app: Flask, listener: socket.socket, settings: Settings):
    """waitress, sized so that followers (long polls) and slow or idle connections never crowd out the rest:
    a thread per follower beyond the threads for ordinary requests, poll() instead of select() (which stops at
    1,024 descriptors), and silent connections closed after idle_timeout."""
    from waitress import create_server

    # Every thread waiting for CPython's interpreter lock wakes at each switch interval (5 ms by default) to
    # ask for it. A job's end releases its followers' threads at once, and with a thousand of them those
    # wake-ups took most of the time: a thousand followers' answers took 0.6 s to 14 s, against 0.3-0.65 s with
    # 50 ms. The requests between are short or wait on I/O, which gives the lock up at once.
    sys.setswitchinterval(0.05)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is N": load, not a fault
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + 256  # and the jobs' pipes, the database, the listener
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY
                                                    else wanted, hard))
    # The app refuses a body over max_body with its own 413; waitress, which counts a chunked body's framing
    # too, only stops bodies far larger before they are read.
    server = create_server(app, sockets=[listener], threads=settings.http_threads + settings.max_followers,
                           connection_limit=settings.max_connections,
                           channel_timeout=max(1, int(settings.idle_timeout)),
                           cleanup_interval=max(1, int(settings.idle_timeout / 4)), asyncore_use_poll=True,
                           backlog=2048, max_request_body_size=2 * settings.max_body + 65536, ident="")
    server.channel_class = secure_channel_class()
    deadline = 3 * settings.idle_timeout
    maintenance = server.maintenance

    def close_slow_requests(now: float) -> None:
        """waitress closes connections that have been silent for idle_timeout; this also closes one whose
        request, trickled a byte at a time, has not arrived whole within three times that."""
        maintenance(now)
        for channel in list(server.active_channels.values()):
            began = getattr(channel, "request_began", None)
            if channel.request is not None and not channel.requests and began and now - began > deadline:
                channel.will_close = True

    server.maintenance = close_slow_requests
    return server


def secure_channel_class():
    """waitress's connection, whose own error answers (malformed HTTP, never seen by the app) carry the
    headers every response of this server carries."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class SecureErrorTask(ErrorTask):
        def execute(self):
            self.response_headers.extend([("X-Content-Type-Options", "nosniff"),
                                          ("Cross-Origin-Resource-Policy", "same-origin")])
            super().execute()  # adds its own headers and writes them with the body

    class SecureChannel(HTTPChannel):
        error_task_class = SecureErrorTask
        request_began = None  # when the request now arriving began (see serve)

        def received(self, data):
            if self.request is None and data:
                self.request_began = time.time()  # the clock waitress's maintenance is given
            return super().received(data)

    return SecureChannel


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return socket.create_server(address, family=family, reuse_port=reuse_port, backlog=2048)


def public_names(host: str) -> tuple[str, ...]:
    """The machine's names, which browsers on other machines use, when the server listens beyond loopback."""
    try:
        if ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return ()
    except ValueError:
        return ()
    return tuple({socket.gethostname(), socket.getfqdn()} - {""})


def claim_database(path: str) -> int:
    """Hold an exclusive flock on the database file for the life of the process: one server per SQLite
    database, whatever path (link, bind mount) names it. flock and SQLite's fcntl locks do not interact on
    Linux. The descriptor is returned and kept open while the server runs: closing it would drop SQLite's
    own locks of the file, so it is closed only when start-up failed and the store is closed."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OSError("another app.py is serving it (run several instances on PostgreSQL instead)") from None
    return descriptor


if __name__ == "__main__":
    sys.exit(main())

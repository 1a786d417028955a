"""A job orchestration server that speaks Inedo Otter's Job Orchestration API.

Shell scripts and other tools trigger the named jobs of templates.toml, poll their status and read their logs:

    GET|POST /api/jobs/trigger?template=NAME&key=KEY    -> the job token
    GET|POST /api/jobs/status?token=TOKEN&key=KEY       -> Pending | Executing | Succeeded | Warning | Error
    GET|POST /api/jobs/logs?token=TOKEN&key=KEY         -> one "LEVEL: message" line per log entry

Extensions that Otter clients never see unless they ask: ``offset`` and ``wait`` on logs, ``wait`` on status,
/api/jobs/cancel and /api/templates. Jobs live in SQLite (schema.sql, beside this file); a pool of worker
threads runs them. Run ``python app.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
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
from collections import deque
from pathlib import Path
from typing import NamedTuple

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

#
# Constants and status words.
#

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "schema.sql"

PENDING, EXECUTING, SUCCEEDED, WARNING, ERROR = "Pending", "Executing", "Succeeded", "Warning", "Error"
FINAL_STATUSES = frozenset({SUCCEEDED, WARNING, ERROR})
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")  # in rising severity
LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}
STATUS_BY_WORST_LEVEL = {"DEBUG": SUCCEEDED, "INFO": SUCCEEDED, "WARN": WARNING, "ERROR": ERROR}

API_PARAMETERS = ("template", "key", "token")  # reserved as variable names everywhere
TRIGGER_PARAMETERS = ("template", "key")  # what trigger reads; any other parameter is a variable
JOB_PARAMETERS = ("token", "key")  # what status, logs and cancel read
BUILTIN_VARIABLES = ("JobToken", "TemplateName")
BUILTIN_NAMES = frozenset(name.lower() for name in BUILTIN_VARIABLES)
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")
# $Name, ${Name}, or $$ for a literal dollar sign.
REFERENCE_PATTERN = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)|\$)")
# Names that change how programs run, refused as variables wherever they come from (compared in lower case).
# Beyond the list: the names through which glibc loads code or files into any program (glibc's own
# list of variables unsafe for setuid programs, and the locale and time zone names, which may be paths).
FORBIDDEN_NAMES = frozenset(
    "path home shell user ifs env bash_env cdpath ps4 shellopts bashopts tmpdir"
    " gconv_path getconf_dir glibc_tunables hostaliases localdomain locpath nis_path nlspath res_options"
    " resolv_host_conf tzdir tz lang language".split()
)
FORBIDDEN_PREFIXES = ("ld_", "dyld_", "bash_", "python", "perl", "ruby", "node_", "git_", "ssh_", "lc_", "malloc_")
FORBIDDEN_SUFFIXES = ("_proxy",)

# Programs that run an argument as code. An exec step may not put a variable into that argument, since a
# request's value would become code: a run step passes values to its script as environment variables.
# A POSIX shell runs its first operand when one of its option clusters has c (-c, -ec); o and O take a value.
SHELLS = frozenset("sh bash dash zsh ksh mksh ash yash".split())


class CodeOptions(NamedTuple):
    """How a program's options take code, by the letters of its short options and the names of its long ones."""
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
    "flock": CodeOptions("c", value="wE", long_code=("--command",), long_value=("--timeout", "--conflict-exit-code"),
                         anywhere=True),  # flock FILE -c COMMAND
    "script": CodeOptions("c", value="ETIOBm", long_code=("--command",), anywhere=True),
    "env": CodeOptions("S", value="uCP", long_code=("--split-string",), long_value=("--unset", "--chdir")),
}
# sudo -s/-i (--shell/--login) runs its whole command line with a shell; these of its options take a value.
SUDO_VALUES = ("uUgpCDhrtT", ("--user", "--other-user", "--group", "--prompt", "--close-from", "--chdir",
                              "--host", "--role", "--type", "--command-timeout"))
# Account tools whose -s/--shell names a login shell to record, not a command to run.
SHELL_SETTERS = frozenset("useradd usermod adduser chsh".split())

MAX_VALUE_BYTES = 8 * 1024
MAX_VARIABLES = 100
MAX_PARAMETERS = 200  # parsed at most, so that a flood of fields costs nothing
MAX_WAIT_SECONDS = 60.0
MAX_LINE_BYTES = 64 * 1024  # a longer line of output is stored as entries of at most this much
DEFAULT_MAX_LOG_BYTES = 10 * 1024 * 1024

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
LEFTOVER_GRACE = 1.0  # seconds a step's leftover processes may hold its output open after it exited
CANCEL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a job is canceled
LOG_FLUSH_SECONDS = 0.05  # a running job's output reaches the database at least this often
LOG_FLUSH_ENTRIES = 5000
POLL_SECONDS = 0.1  # how often a running step looks at its deadline and at stop requests
# Characters that some reader of a log could take for a line break, and NUL: never stored as they are.
UNSAFE_CHARACTERS = re.compile("[\x00\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")

#
# Errors.
#


class ApiError(Exception):
    """A request that cannot be served: an HTTP status and a short plain-text reason."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.headers = message, status, headers or {}


class TemplateError(Exception):
    """A templates.toml that cannot be served, naming the file, the template and the field."""


def log_line(message: str) -> None:
    """The server's own log: one line on stderr. Request values and keys never go here."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def shown(text: str, limit: int = 40) -> str:
    """A request-supplied name, quoted, shortened and reduced to ASCII, fit to put in an error message."""
    return ascii(text[:limit] + ("..." if len(text) > limit else ""))


#
# Job templates.
#

TEMPLATE_FIELDS = frozenset(
    "description key key_env api allow_new_variables timeout max_concurrent max_log_bytes variables steps".split()
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

    def check(self, value: str) -> None:
        """Refuse a request's value (empty included) that breaks the rules; `required` is checked later."""
        if self.choices and value not in self.choices:
            allowed = "the allowed choices" if self.secret else ", ".join(self.choices)
            raise ApiError(f"Variable {self.name}: the value must be one of {allowed}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ApiError(f"Variable {self.name}: the value does not match the pattern {self.pattern.pattern}")


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
    def secret_names(self) -> list[str]:
        return [v.name for v in self.variables.values() if v.secret]


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
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # TOML true is an int
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
    if lowered in (b.lower() for b in BUILTIN_VARIABLES):
        return "is a built-in variable"
    if lowered in FORBIDDEN_NAMES or lowered.startswith(FORBIDDEN_PREFIXES) or lowered.endswith(FORBIDDEN_SUFFIXES):
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
    try:
        if default:  # an empty default means "no value": the request must then give one that follows the rules
            variable.check(default)
    except ApiError as error:
        fields.fail("default", f"does not follow its own rules ({error.message})")
    return variable


def code_arguments(argv: tuple[str, ...]) -> list[tuple[str, int]]:
    """(program, position) of each argument that a command runs as code: a shell's -c script, python's -c,
    perl's -e, su's -c and the like (SHELLS, INTERPRETERS, sudo -s), also behind a wrapper (env, timeout...)."""
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
    while position < len(argv) and (argv[position] != "--" or options.anywhere):  # su passes -c on to the shell
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
    for program, position in code_arguments(command) if kind == "exec" else ():
        for match in REFERENCE_PATTERN.finditer(command[position]):
            referenced = match.group(1) or match.group(2)
            if referenced and referenced.lower() not in BUILTIN_NAMES:
                fields.fail("exec", f"puts ${referenced} into the code that {program!r} runs (argument {position}), "
                                    "where a request's value would become code: use a run step, which passes "
                                    "variables as environment variables, or pass the value as an argument of its own")
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
    known = None if allow_new else set(variables) | {b.lower() for b in BUILTIN_VARIABLES}
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
    parse_template: a stored version's are never used, its jobs' values having been resolved when triggered)."""
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


def check_key(given: str | None, digest: str) -> None:
    """Refuse (403) a request whose key does not open a template with this key digest; constant time."""
    if digest and not (hmac.compare_digest(key_digest(given or ""), digest) and given):
        raise ApiError("Invalid API key" if given else "Missing API key", 403)


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


class TemplateCatalog:
    """The templates in force (reloadable) and every version a job was triggered with."""

    def __init__(self, path: str | Path, store: JobStore):
        self.path, self.store = Path(path), store
        self._current: dict[str, JobTemplate] = {}
        self._versions: dict[int, JobTemplate] = {}
        self._lock = threading.Lock()
        self._stamp = None
        self.reload()

    def reload(self) -> None:
        """Load the file again; on any problem raise TemplateError and keep the templates in force."""
        stamp = self._file_stamp()
        templates = load_templates(self.path)
        for name, template in templates.items():
            version = self.store.save_template_version(template.name, template.definition, template.key_digest)
            templates[name] = dataclasses.replace(template, version=version)
        with self._lock:
            self._current = templates
            self._versions.update((t.version, t) for t in templates.values())
            self._stamp = stamp

    def get(self, name: str) -> JobTemplate | None:
        return self._current.get(name.lower())

    def api_templates(self) -> list[JobTemplate]:
        return [t for t in self._current.values() if t.api]

    def version(self, version: int) -> JobTemplate:
        """The template a job was triggered with, from memory or else from the store."""
        template = self._versions.get(version)
        if template is None:
            name, definition, digest = self.store.template_version(version)
            template = parse_template(name, json.loads(definition), f"stored template {name!r} (version {version})")
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
        """Reload when the file changed since the last load (or when forced, on SIGHUP), logging one line
        either way; returns whether the new templates are in force."""
        if not force and self._file_stamp() == self._stamp:
            return False
        try:
            self.reload()
        except (TemplateError, sqlite3.Error) as error:
            self._stamp = self._file_stamp()  # report a bad file once, not every second
            log_line(f"templates not reloaded, the previous ones stay in force: {error}")
            return False
        log_line(f"templates reloaded from {self.path}: {', '.join(t.name for t in self._current.values())}")
        return True


#
# SQLite store.
#


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: int
    template: str
    template_version: int
    status: str
    key_digest: str
    log_count: int  # entries logged so far, read in the same statement as the status


class PendingWrite:
    """One write queued for the next transaction, and then its outcome."""

    __slots__ = ("operation", "after_commit", "wake", "your_turn", "result", "error")

    def __init__(self, operation, after_commit=None, wait: bool = True):
        self.operation, self.after_commit = operation, after_commit
        self.wake = threading.Lock() if wait else None  # held until it is done, or its thread's turn to commit
        if self.wake:
            self.wake.acquire()
        self.your_turn = False
        self.result = self.error = None


class JobStore:
    """Every SQL statement of the program.

    Writes are group-committed on one connection by one thread at a time, the committer, without a thread of
    its own. A thread queues its write; when no commit is under way it becomes the committer and commits in one
    transaction every write queued by then, else it sleeps on a lock of its write's own until a committer has
    committed it. A committer whose own write is done wakes the writers of its batch, one each, and passes the
    turn to the oldest writer still queued. So a lone write costs no thread hand-off, and under load each
    waiting writer is woken once (a shared condition woke them all, each to wait again: measured, 31.7
    context switches per trigger request under load before, 26.4 after). Each thread reads on a connection
    of its own (WAL: reads never wait for writes)."""

    MAX_BATCH = 500

    def __init__(self, path: str | Path, busy_timeout: float = 5.0):
        self.path, self.busy_timeout = str(path), busy_timeout
        self._local = threading.local()
        self._writer = self._connect(writer=True)
        try:
            self._writer.executescript(SCHEMA_PATH.read_text())
        except BaseException:
            self._writer.close()
            raise
        self._queue: deque[PendingWrite] = deque()
        self._mutex = threading.Lock()  # guards the queue and the two flags, never held during a commit
        self._idle = threading.Condition(self._mutex)  # notified when a turn ends
        self._committing = False
        self._closed = False

    def _connect(self, writer: bool = False) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        if writer:  # on a new file this must come first: switching to WAL writes the header
            connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a crash of this process
        return connection

    def _reader(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        if connection.in_transaction:  # a log stream that was never closed
            connection.execute("ROLLBACK")
        return connection

    def _write(self, operation, after_commit=None):
        """Run operation(connection) in a transaction and return its result once committed;
        after_commit(result) runs right after the commit, in commit order."""
        write = PendingWrite(operation, after_commit)
        if not self._queue_write(write):
            self._commit_turn(write)
        else:
            write.wake.acquire()  # until a committer has committed it, or passes this thread the turn
            if write.your_turn:
                self._commit_turn(write)
        if write.error is not None:
            raise write.error
        return write.result

    def _write_later(self, operation) -> None:
        """Queue a write without waiting for it: the committer under way, or this thread, commits it (a
        failure is not reported)."""
        write = PendingWrite(operation, wait=False)
        try:
            if not self._queue_write(write):
                self._commit_turn(write)
        except sqlite3.OperationalError:
            pass

    def _queue_write(self, write: PendingWrite) -> bool:
        """Queue a write; whether a commit is under way (else this thread has the turn now)."""
        with self._mutex:
            if self._closed:
                raise sqlite3.OperationalError("the job store is closed: the server is stopping")
            self._queue.append(write)
            if self._committing:
                return True
            self._committing = True
            return False

    def _commit_turn(self, own: PendingWrite) -> None:
        """Holding the turn: commit batches of queued writes until `own` is committed, waking the writers of
        each batch, then pass the turn on (see _pass_turn)."""
        own_done = False
        while True:
            with self._mutex:
                if own_done and self._pass_turn():
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.MAX_BATCH))]
            try:
                self._commit_batch(batch)
            except BaseException:  # a KeyboardInterrupt in the main thread: the batch failed, the turn goes on
                self._wake_writers(batch, own)
                with self._mutex:
                    if own in self._queue:  # not reached yet: it goes with this thread
                        self._queue.remove(own)
                    if not self._pass_turn():  # writes nobody waits for are left: the next writer commits them
                        self._end_turn()
                raise
            own_done = self._wake_writers(batch, own) or own_done

    def _pass_turn(self) -> bool:
        """Call holding the mutex, once the turn holder's own write is done: pass the turn to the oldest writer
        still queued, or end it when nothing is queued. False when only writes nobody waits for are left."""
        successor = next((write for write in self._queue if write.wake is not None), None)
        if successor is not None:
            successor.your_turn = True
            successor.wake.release()
            return True
        if not self._queue:
            self._end_turn()
            return True
        return False

    def _end_turn(self) -> None:
        self._committing = False
        self._idle.notify_all()

    @staticmethod
    def _wake_writers(batch: list[PendingWrite], own: PendingWrite) -> bool:
        """Wake the writers of a committed (or failed) batch but the turn holder; whether its own was in it."""
        for write in batch:
            if write is not own and write.wake is not None:
                write.wake.release()
        return own in batch

    def _commit_batch(self, batch: list[PendingWrite]) -> None:
        error = self._commit(batch)
        if error is not None and len(batch) > 1 and not isinstance(error, sqlite3.OperationalError):
            for write in batch:  # one bad write must not fail the others: each again, alone
                write.error = None
                self._commit([write])

    def _commit(self, batch: list[PendingWrite]) -> Exception | None:
        """Run a batch of writes in one transaction; the error that failed them all, if any.
        (An OperationalError, such as a full disk or a lock held by another program, fails every write alike;
        any other error belongs to one write, and the caller retries the others.)"""
        connection = self._writer
        try:
            connection.execute("BEGIN IMMEDIATE")
            for write in batch:
                write.result = write.operation(connection)
            connection.execute("COMMIT")
        except BaseException as error:  # sqlite3.Error above all; anything else is a bug, reported the same way
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            failure = error if isinstance(error, Exception) else sqlite3.OperationalError("the write was interrupted")
            for write in batch:
                write.error = failure
            if failure is not error:  # a KeyboardInterrupt goes on up the committing thread only
                raise
            return error
        for write in batch:
            if write.after_commit is not None:
                try:
                    write.after_commit(write.result)
                except Exception:
                    traceback.print_exc()
        return None

    def close(self) -> None:
        """Let the committer under way commit what is queued, then close; later writes fail with an
        OperationalError."""
        with self._mutex:
            self._closed = True
            while self._committing:
                self._idle.wait()
        self._writer.close()

    # Templates.

    def save_template_version(self, name: str, definition: str, digest: str) -> int:
        def save(db):
            db.execute(
                "INSERT OR IGNORE INTO template_versions (name, definition, key_digest) VALUES (?, ?, ?)",
                (name, definition, digest),
            )
            return db.execute(
                "SELECT id FROM template_versions WHERE name = ? AND definition = ? AND key_digest = ?",
                (name, definition, digest),
            ).fetchone()[0]

        return self._write(save)

    def template_version(self, version: int) -> tuple[str, str, str]:
        return self._reader().execute(
            "SELECT name, definition, key_digest FROM template_versions WHERE id = ?", (version,)
        ).fetchone()

    # Jobs.

    def insert_job(self, template: JobTemplate, variables: dict[str, str], then=None) -> int:
        """Commit a new Pending job and return its id; then(id) runs right after the commit, in id order."""
        row = (template.version, template.name, json.dumps(variables), time.time())
        return self._write(
            lambda db: db.execute(
                "INSERT INTO jobs (template_version, template, status, variables, created_at)"
                " VALUES (?, ?, 'Pending', ?, ?)", row,
            ).lastrowid,
            then,
        )

    # Every read is one statement where it can be: under load each call into SQLite costs a hand-off of the GIL.

    def get_job(self, job_id: int) -> JobRecord | None:
        row = self._reader().execute(
            "SELECT j.id, j.template, j.template_version, j.status, v.key_digest,"
            " coalesce((SELECT max(seq) + 1 FROM logs WHERE job_id = j.id), 0)"
            " FROM jobs j JOIN template_versions v ON v.id = j.template_version WHERE j.id = ?",
            (job_id,),
        ).fetchone()
        return JobRecord(*row) if row else None

    def job_progress(self, job_id: int) -> tuple[str, int]:
        """(status, entries logged so far) of an existing job, read in one statement."""
        return self._reader().execute(
            "SELECT status, coalesce((SELECT max(seq) + 1 FROM logs WHERE job_id = ?), 0) FROM jobs WHERE id = ?",
            (job_id, job_id),
        ).fetchone()

    def job_status(self, job_id: int) -> str | None:
        row = self._reader().execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def unfinished_jobs(self, status: str) -> list[tuple[int, int]]:
        """(id, template_version) of the jobs in this status, oldest first."""
        return self._reader().execute(
            "SELECT id, template_version FROM jobs WHERE status = ? ORDER BY id", (status,)
        ).fetchall()

    def pending_variables(self, job_id: int) -> dict[str, str] | None:
        """The variables of a Pending job, or None when it is not Pending (canceled meanwhile)."""
        row = self._reader().execute(
            "SELECT variables FROM jobs WHERE id = ? AND status = 'Pending'", (job_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def mark_executing(self, job_id: int, started_at: float) -> None:
        """Pending -> Executing, committed before the job's first process starts or its first log entries are
        stored: a job found Executing after a crash may have done something and is never run again. (A job of
        log steps only, with fewer than LOG_FLUSH_ENTRIES entries, goes from Pending to final at once.)"""
        self._write(lambda db: db.execute(
            "UPDATE jobs SET status = 'Executing', started_at = ? WHERE id = ? AND status = 'Pending'",
            (started_at, job_id),
        ))

    def note_process_group(self, job_id: int, group: int) -> None:
        """The process group a job's step runs in, to clean up after a crash; queued without waiting."""
        self._write_later(lambda db: db.execute("UPDATE jobs SET process_group = ? WHERE id = ?", (group, job_id)))

    def append_logs(self, job_id: int, first_seq: int, entries: list[tuple[str, str]]) -> None:
        entries = list(entries)  # the caller's buffer goes on growing
        self._write(lambda db: self._insert_logs(db, job_id, first_seq, entries))

    @staticmethod
    def _insert_logs(db, job_id: int, first_seq: int, entries) -> None:
        db.executemany(
            "INSERT INTO logs (job_id, seq, level, message) VALUES (?, ?, ?, ?)",
            ((job_id, first_seq + i, level, message) for i, (level, message) in enumerate(entries)),
        )

    def finish_job(self, job_id: int, status: str, first_seq: int, entries, secrets=(),
                   started_at: float | None = None) -> bool:
        """Store the last log entries and the final status in one transaction, removing the named secret
        variables from the stored ones; False (and nothing stored) when the job was already final."""
        entries = list(entries)
        paths = [f'$."{name}"' for name in secrets]  # names are letters, digits and _ only
        forget = f"json_remove(variables, {', '.join('?' * len(paths))})" if paths else "variables"

        def finish(db):
            changed = db.execute(
                "UPDATE jobs SET status = ?, started_at = coalesce(started_at, ?), finished_at = ?,"
                f" process_group = NULL, variables = {forget}"
                " WHERE id = ? AND status IN ('Pending', 'Executing')",
                (status, started_at, time.time(), *paths, job_id),
            ).rowcount
            if changed:
                self._insert_logs(db, job_id, first_seq, entries)
            return bool(changed)

        return self._write(finish)

    def interrupted_jobs(self) -> list[tuple[int, int, int | None]]:
        """(id, template_version, process_group) of the jobs a previous process left Executing."""
        return self._reader().execute(
            "SELECT id, template_version, process_group FROM jobs WHERE status = 'Executing' ORDER BY id"
        ).fetchall()

    def log_count(self, job_id: int) -> int:
        return self.job_progress(job_id)[1]

    def read_logs(self, job_id: int, offset: int, count: int, chunk_rows: int = 5000):
        """The entries from `offset` up to `count` as "LEVEL: message\\n" text.

        Entries never change once written, so a count read with the job's status (job_progress) bounds a
        consistent answer without a transaction. A log that fits in one chunk comes back as one string (so
        the response has a length and the connection stays open); a longer one as an iterator of chunks,
        read from the database as they are sent, never all at once."""
        if offset >= count:
            return ""
        cursor = self._reader().execute(
            "SELECT level || ': ' || message || char(10) FROM logs WHERE job_id = ? AND seq >= ? AND seq < ?"
            " ORDER BY seq",
            (job_id, offset, count),
        )
        first = "".join(row[0] for row in cursor.fetchmany(chunk_rows))
        if count - offset <= chunk_rows:
            cursor.close()
            return first

        def chunks():
            try:
                yield first
                while rows := cursor.fetchmany(chunk_rows):
                    yield "".join(row[0] for row in rows)
            finally:
                cursor.close()

        return chunks()

    # Upkeep.

    def prune_finished(self, before: float, stopping: threading.Event | None = None, batch: int = 500) -> int:
        """Delete finished jobs older than `before` with their logs, in small transactions, then give the
        freed pages back to the file system. Returns the number of jobs deleted."""
        def prune_some(db) -> int:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM jobs WHERE finished_at < ? ORDER BY finished_at LIMIT ?", (before, batch)
            )]
            marks = ",".join("?" * len(ids))
            db.execute(f"DELETE FROM logs WHERE job_id IN ({marks})", ids)
            db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            return len(ids)

        deleted = 0
        while (stopping is None or not stopping.is_set()) and (count := self._write(prune_some)):
            deleted += count
        if deleted:
            self._write(lambda db: db.execute("PRAGMA incremental_vacuum").fetchall())
        return deleted


#
# Job runner.
#


def sanitize_line(line: str) -> str:
    """A log entry's text with nothing a reader could take for a line break, and no NUL."""
    return UNSAFE_CHARACTERS.sub("\ufffd", line.removesuffix("\r"))


class JobExecution:
    """One job running on a worker thread: its steps, its processes and its log, until it is final."""

    def __init__(self, runner: JobRunner, job_id: int, template: JobTemplate, queued_variables: dict | None = None):
        self.runner, self.store, self.job_id, self.template = runner, runner.store, job_id, template
        self.queued_variables = queued_variables  # as triggered, when the queue kept them
        self.variables: dict[str, str] | None = None  # once running
        self.started_at: float | None = None
        self.marked_executing = False
        self.values: dict[str, str] = {}  # by lower-case name, for substitution
        self.secrets: list[str] = []
        self.secret_bytes: list[bytes] = []  # the same, as process output carries them
        self.seq = 0  # of the next entry to store
        self.buffer: list[tuple[str, str]] = []
        self.buffered_since = 0.0
        self.worst = "DEBUG"
        self.log_bytes = 0
        self.dropped_lines = self.dropped_bytes = 0
        self.stop_reason: str | None = None  # logged as an ERROR entry as soon as the job notices it
        self.stop_logged = False
        self.stop_graceful = False
        self.process: subprocess.Popen | None = None
        self.storage_error: sqlite3.Error | None = None

    # Log entries.

    def log(self, level: str, text: str) -> None:
        """Log a message of the runner's or a log step's, one entry per line (a final newline ends the last
        line, it starts no empty one), never dropped."""
        for line in self.mask(text).removesuffix("\n").split("\n"):
            self._buffer(level, sanitize_line(line))

    def log_output(self, level: str, raw: bytes) -> None:
        """Log one entry of a process's output (a line, or a piece of a long one: see take_output), masked,
        within the log budget, which counts the output as it came."""
        if self.log_bytes + len(raw) > self.template.max_log_bytes:
            self.dropped_lines += 1
            self.dropped_bytes += len(raw)
            return
        self.log_bytes += len(raw)
        self._buffer(level, sanitize_line(self.mask_output(raw).decode("utf-8", "replace")))

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def mask_output(self, raw: bytes) -> bytes:
        for secret in self.secret_bytes:
            raw = raw.replace(secret, b"***")
        return raw

    def _buffer(self, level: str, line: str) -> None:
        if not self.buffer:
            self.buffered_since = time.monotonic()
        self.buffer.append((level, line))
        if level != self.worst and LEVEL_RANK[level] > LEVEL_RANK[self.worst]:
            self.worst = level
        if len(self.buffer) >= LOG_FLUSH_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries; a storage failure stops the job (it ends in Error when storage allows)."""
        if not self.buffer or self.storage_error or not self.mark_executing():
            return
        try:
            self.store.append_logs(self.job_id, self.seq, self.buffer)
        except sqlite3.Error as error:
            self.storage_error = error
            self.request_stop(f"Could not store the job's log ({error}); the job was stopped", graceful=False)
            return
        self.seq += len(self.buffer)
        self.buffer = []
        self.runner.notify(self.job_id)

    def mark_executing(self) -> bool:
        """Commit Pending -> Executing once, before the job's first process starts or its first log entries are
        stored, so that a job found Pending at a restart has done nothing yet; False (and the job stopped) when
        storage fails."""
        if self.marked_executing:
            return True
        try:
            self.store.mark_executing(self.job_id, self.started_at)
        except sqlite3.Error as error:
            self.storage_error = error
            self.request_stop(f"Could not store that the job started ({error}); it was stopped", graceful=False)
            return False
        self.marked_executing = True
        return True

    def flush_if_due(self) -> None:
        if self.buffer and time.monotonic() - self.buffered_since >= LOG_FLUSH_SECONDS:
            self.flush()

    # Stopping from other threads (cancel, shutdown).

    def request_stop(self, reason: str, graceful: bool) -> None:
        """Stop the job: its processes get SIGTERM (graceful, SIGKILL after CANCEL_GRACE) or SIGKILL."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_graceful = reason, graceful
        elif not graceful:
            self.stop_graceful = False
        process = self.process
        if process is not None:
            signal_group(process.pid, signal.SIGTERM if self.stop_graceful else signal.SIGKILL)

    # Running.

    def run(self, variables: dict[str, str]) -> None:
        """Run every step, then store the final status; whatever happens, the job ends final."""
        try:
            self.started_at = time.time()
            self.variables = variables
            self.values = {name.lower(): value for name, value in variables.items()}
            self.values.update(jobtoken=str(self.job_id), templatename=self.template.name)
            secrets = {variables[name] for name in self.template.secret_names if variables.get(name)}
            secrets |= {line for secret in secrets for line in secret.split("\n") if line}  # output comes by lines
            self.secrets = sorted(secrets, key=len, reverse=True)
            self.secret_bytes = [secret.encode() for secret in self.secrets]
            deadline = time.monotonic() + self.template.timeout if self.template.timeout else None
            for step in self.template.steps:
                if self.stop_reason or not self.run_step(step, deadline):
                    break
            self.announce_stop()
        except Exception as error:  # a bug here must not leave the job Executing
            traceback.print_exc()
            self.log("ERROR", f"Internal error in the job runner: {error!r}")
        self.finish()

    def announce_stop(self) -> None:
        if self.stop_reason and not self.stop_logged:
            self.stop_logged = True
            self.log("ERROR", self.stop_reason)

    def run_step(self, step: Step, job_deadline: float | None) -> bool:
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
        if code is None:  # timed out, stopped, or could not start
            return False
        if code != 0:
            self.log("ERROR", f"Process exited with code: {code}")
            return step.continue_on_error
        return True

    def environment(self, step: Step) -> dict[str, str]:
        """A minimal base, the job's variables and built-ins, then the step's fixed env."""
        env = {"PATH": BASE_PATH, "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8"}
        env.update(self.variables)
        env.update(JobToken=str(self.job_id), TemplateName=self.template.name)
        env.update(step.env)
        return env

    def run_process(self, step: Step, argv: list[str], deadline: float | None, why: str) -> int | None:
        """Run one process in a group of its own, logging its output; its exit code, or None if it timed
        out, was stopped or could not start. Nothing of its process group outlives this call."""
        if not self.mark_executing():
            return None
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
            self.request_stop(self.stop_reason, self.stop_graceful)
        try:
            self.store.note_process_group(self.job_id, process.pid)
            return self.supervise(process, step, deadline, why)
        finally:
            self.process = None  # no more signals from other threads: the pid is about to be reaped
            signal_group(process.pid, signal.SIGKILL)  # the leader is not reaped yet: the group id is ours
            process.wait()
            process.stdout.close()
            process.stderr.close()

    def supervise(self, process: subprocess.Popen, step: Step, deadline: float | None, why: str) -> int | None:
        streams = {process.stdout.fileno(): [step.stdout_level, b""], process.stderr.fileno(): [step.stderr_level, b""]}
        poller = select.poll()  # no descriptor of its own to set up and close, unlike epoll, for each process
        exit_watch = process_exit_watch(process.pid)
        try:
            for fd in streams:
                os.set_blocking(fd, False)
                poller.register(fd, select.POLLIN)
            if exit_watch is not None:
                poller.register(exit_watch, select.POLLIN)
            exited_at = kill_at = killed_at = None
            while streams or exited_at is None:
                now = time.monotonic()
                if exited_at is None and exit_watch is None and process_exited(process.pid):
                    exited_at = now
                if deadline is not None and now >= deadline and self.stop_reason is None:
                    self.request_stop(f"{why}; its processes were killed", graceful=False)
                if self.stop_reason and kill_at is None:
                    self.announce_stop()
                    kill_at = now + (CANCEL_GRACE if self.stop_graceful else 0)
                if kill_at is not None and now >= kill_at:
                    signal_group(process.pid, signal.SIGKILL)
                    kill_at, killed_at = float("inf"), killed_at or now
                if exited_at is not None and streams and killed_at is None and now - exited_at >= LEFTOVER_GRACE:
                    self.log("WARN", f"The step exited but processes it started still held its output open after "
                                     f"{LEFTOVER_GRACE:g} s; they were killed")
                    signal_group(process.pid, signal.SIGKILL)
                    killed_at = now
                if exited_at is not None and streams and killed_at is not None and now - killed_at >= LEFTOVER_GRACE:
                    # Only a process that left the group (setsid) can still hold the output: stop reading it.
                    self.log("WARN", "Processes that left the step's process group still hold its output;"
                                     " it is no longer read and they are left running")
                    break
                wait = POLL_SECONDS
                if self.buffer:
                    wait = min(wait, max(0.0, self.buffered_since + LOG_FLUSH_SECONDS - now))
                if deadline is not None and self.stop_reason is None:
                    wait = min(wait, max(0.0, deadline - now))
                for fd, _ in poller.poll(wait * 1000):  # POLLIN, or POLLHUP at the end: both read
                    if fd == exit_watch:
                        poller.unregister(exit_watch)
                        exited_at = time.monotonic()
                        continue
                    chunk = os.read(fd, 65536)
                    stream = streams[fd]
                    if chunk:
                        self.take_output(stream, chunk)
                    else:
                        poller.unregister(fd)
                        if stream[1]:  # the last line, unfinished
                            self.log_output(stream[0], stream[1])
                        del streams[fd]
                self.flush_if_due()
            code = process_exit_code(process)
        finally:
            if exit_watch is not None:
                os.close(exit_watch)
        if self.stop_reason:
            return None
        return code

    def take_output(self, stream: list, chunk: bytes) -> None:
        """Log the complete lines of a chunk of output and keep the unfinished last one, as it came, for the
        next chunk. A line longer than MAX_LINE_BYTES is logged in entries of that much output at most; each
        entry is masked on its own, so no cut may split a secret (see cut_point)."""
        level, partial = stream
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:  # at most 2 * MAX_LINE_BYTES: the unfinished line never grows past MAX_LINE_BYTES
            line = line.removesuffix(b"\r")  # of a CRLF: not a piece of its own once the line is cut
            while len(line) > MAX_LINE_BYTES:
                cut = self.cut_point(line, finished=True)
                self.log_output(level, line[:cut])
                line = line[cut:]
            self.log_output(level, line)
        while len(partial.removesuffix(b"\r")) > MAX_LINE_BYTES:  # a \r may be the start of a CRLF
            cut = self.cut_point(partial, finished=False)
            self.log_output(level, partial[:cut])
            partial = partial[cut:]
        stream[1] = partial

    def cut_point(self, line: bytes, finished: bool) -> int:
        """Where to cut a line longer than MAX_LINE_BYTES: the last place at or before that which is neither
        inside a UTF-8 character, nor inside an occurrence of a secret, nor (in an unfinished line) past the
        start of a secret that may still be arriving at its end. Secrets are at most MAX_VALUE_BYTES, so such a
        place is found in the line's last half unless secrets occur there overlapping one another all along
        (a secret "aa" in "aaaa..."); then MAX_LINE_BYTES."""
        lowest = MAX_LINE_BYTES // 2
        highest = MAX_LINE_BYTES if finished else min(MAX_LINE_BYTES, self.arriving_secret(line))
        if highest <= lowest:
            return MAX_LINE_BYTES
        inside = bytearray(highest - lowest + 1)  # 1 where a cut would split an occurrence of a secret
        for secret in (secret for secret in self.secret_bytes if len(secret) > 1):
            start = line.find(secret, max(0, lowest - len(secret) + 1), highest + len(secret) - 1)
            while start != -1:
                first, last = max(start + 1, lowest), min(start + len(secret) - 1, highest)
                inside[first - lowest:last - lowest + 1] = b"\1" * (last - first + 1)
                start = line.find(secret, start + 1, highest + len(secret) - 1)
        for cut in range(highest, lowest, -1):
            if not inside[cut - lowest] and line[cut] & 0xC0 != 0x80:  # not 10xxxxxx: a character's first byte
                return cut
        return MAX_LINE_BYTES

    def arriving_secret(self, line: bytes) -> int:
        """Where the longest end of an unfinished line that begins a secret starts (len(line) if none)."""
        earliest = len(line)
        for secret in self.secret_bytes:
            for size in range(min(len(secret) - 1, len(line)), 0, -1):
                if line.endswith(secret[:size]):
                    earliest = min(earliest, len(line) - size)
                    break
        return earliest

    def finish(self) -> None:
        """Store the last entries and the final status, retrying while storage fails (the job cannot end
        in anything but Error then), until the server stops."""
        if self.dropped_lines:
            self.log("WARN", f"The log reached its limit of {self.template.max_log_bytes} bytes: "
                             f"{self.dropped_lines} lines ({self.dropped_bytes} bytes) of output were dropped")
        self.announce_stop()
        status = STATUS_BY_WORST_LEVEL[self.worst]
        delay = 0.5
        while True:
            try:
                self.store.finish_job(self.job_id, status, self.seq, self.buffer, self.template.secret_names,
                                      self.started_at)
                break
            except sqlite3.Error as error:
                if self.runner.stopping.wait(delay):
                    log_line(f"job {self.job_id}: could not store its end ({error}); it ends at the next start")
                    return
                delay = min(delay * 2, 5.0)
        self.seq += len(self.buffer)
        self.buffer = []
        self.runner.notify(self.job_id)


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


class JobRunner:
    """Runs queued jobs on a pool of worker threads in trigger order, honouring each template's
    max_concurrent, and wakes whoever waits on a job."""

    def __init__(self, store: JobStore, catalog: TemplateCatalog, workers: int = 4, max_pending: int = 10000):
        self.store, self.catalog = store, catalog
        self.workers, self.max_pending = workers, max_pending
        self.lock = threading.Condition()
        # Pending jobs by template name: (id, template, variables when small enough to keep, else None).
        self.queues: dict[str, deque[tuple[int, JobTemplate, dict | None]]] = {}
        self.pending = 0
        self.executing: dict[str, int] = {}  # by template name
        self.running: dict[int, JobExecution] = {}
        self.accepting = True
        self.stopping = threading.Event()
        self.hurry = threading.Event()  # set by a second Ctrl-C: end the shutdown grace now
        self.watchers: dict[int, list] = {}  # job id -> [Condition, number of waiters]
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Resolve what a previous process left behind, queue the Pending jobs, start the workers."""
        for job_id, version, group in self.store.interrupted_jobs():
            if group:
                kill_orphaned_group(group, job_id)
            self.store.finish_job(
                job_id, ERROR, self.store.log_count(job_id),
                [("ERROR", "The server stopped while the job ran (found Executing at restart); it was ended")],
                self.secret_names(version),
            )
        for job_id, version in self.store.unfinished_jobs(PENDING):
            try:
                template = self.catalog.version(version)
            except TemplateError as error:
                self.store.finish_job(job_id, ERROR, 0, [("ERROR", f"Its template cannot be loaded: {error}")],
                                      self.secret_names(version))
                continue
            self._enqueue(job_id, template)
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{number}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def secret_names(self, version: int) -> list[str]:
        """The secret variables of a stored template version, read from its definition even where that no
        longer loads as a template."""
        variables = json.loads(self.store.template_version(version)[1]).get("variables", {})
        return [name for name, spec in variables.items() if isinstance(spec, dict) and spec.get("secret") is True]

    # Queue.

    def submit(self, template: JobTemplate, variables: dict[str, str]) -> int:
        """Commit a new job and queue it; the id is returned only once the job is committed."""
        with self.lock:
            if not self.accepting:
                raise ApiError("The server is shutting down and accepts no new jobs", 503, {"Retry-After": "30"})
            if self.pending >= self.max_pending:
                raise ApiError(f"The queue is full ({self.pending} pending jobs); try again later", 503,
                               {"Retry-After": "5"})
        return self.store.insert_job(template, variables,
                                     then=lambda job_id: self._enqueue(job_id, template, variables))

    def _enqueue(self, job_id: int, template: JobTemplate, variables: dict[str, str] | None = None) -> None:
        """Queue a committed job. Its variables are kept with it when small, so that its worker need not read
        them back (a call into SQLite costs a hand-off of the GIL under load); else the worker reads them."""
        if variables is not None and sum(len(name) + len(value) for name, value in variables.items()) > 4096:
            variables = None  # 10,000 pending jobs must not each hold up to a MiB of variables in memory
        with self.lock:
            self.queues.setdefault(template.name, deque()).append((job_id, template, variables))
            self.pending += 1
            self.lock.notify()

    def _next_job(self) -> JobExecution | None:
        """The oldest pending job whose template has room; call with the lock held."""
        best = None
        for name, queue in self.queues.items():
            if queue:
                job_id, template, _ = entry = queue[0]
                limit = template.max_concurrent
                if (limit is None or self.executing.get(name, 0) < limit) and (best is None or job_id < best[0]):
                    best = entry
        if best is None:
            return None
        job_id, template, variables = best
        self.queues[template.name].popleft()
        self.pending -= 1
        self.executing[template.name] = self.executing.get(template.name, 0) + 1
        execution = self.running[job_id] = JobExecution(self, job_id, template, variables)
        return execution

    def _work(self) -> None:
        while True:
            with self.lock:
                execution = None
                while not self.stopping.is_set() and (execution := self._next_job()) is None:
                    self.lock.wait()
                if execution is None:
                    return
            retry = False
            try:
                # A job taken from the queue is Pending: cancel removes a queued job under the same lock.
                variables = execution.queued_variables
                if variables is None:
                    variables = self.store.pending_variables(execution.job_id)
                if variables is not None:  # else canceled in the meantime
                    execution.run(variables)
            except sqlite3.Error as error:  # could not even read the job: it stays Pending, to run later
                log_line(f"job {execution.job_id}: could not start it ({error}); it stays Pending")
                retry = True
            except Exception:  # keep the worker alive whatever happens
                traceback.print_exc()
            finally:
                with self.lock:
                    self.executing[execution.template.name] -= 1
                    del self.running[execution.job_id]
                    if retry:
                        self._requeue(execution.job_id, execution.template)
                    self.lock.notify_all()
            if retry:
                self.stopping.wait(1.0)

    def _requeue(self, job_id: int, template: JobTemplate, variables: dict[str, str] | None = None) -> None:
        """Put a job back in its place in its template's queue; call with the lock held."""
        queue = self.queues.setdefault(template.name, deque())
        queue.append((job_id, template, variables))
        if len(queue) > 1 and queue[-2][0] > job_id:
            self.queues[template.name] = deque(sorted(queue, key=lambda entry: entry[0]))
        self.pending += 1

    # Cancel.

    def cancel(self, job_id: int) -> str:
        """Cancel a Pending or Executing job; it ends in Error. Returns the status after the request."""
        with self.lock:
            queued = None
            for name, queue in self.queues.items():
                for entry in queue:
                    if entry[0] == job_id:
                        queued = (queue, entry)
                        break
            if queued:
                queued[0].remove(queued[1])
                self.pending -= 1
            execution = self.running.get(job_id)
        if queued:
            try:
                self.store.finish_job(job_id, ERROR, 0, [("ERROR", "Job canceled")],
                                      queued[1][1].secret_names)
            except sqlite3.Error:
                with self.lock:  # still Pending in the store: it stays queued
                    self._requeue(*queued[1])
                raise
            self.notify(job_id)
        elif execution is not None:
            execution.request_stop("Job canceled", graceful=True)
            self.wait_until(job_id, lambda: self.store.job_status(job_id) in FINAL_STATUSES, CANCEL_GRACE + 5)
        return self.store.job_status(job_id)

    # Waiting for a job.

    def notify(self, job_id: int) -> None:
        watch = self.watchers.get(job_id)
        if watch is not None:
            with watch[0]:
                watch[0].notify_all()

    def wait_until(self, job_id: int, condition, timeout: float) -> bool:
        """Wait until condition() holds, re-checked whenever the job logs or ends, at most timeout seconds."""
        with self.lock:
            watch = self.watchers.setdefault(job_id, [threading.Condition(), 0])
            watch[1] += 1
        try:
            deadline = time.monotonic() + timeout
            with watch[0]:
                while not (met := condition()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.stopping.is_set():
                        break
                    watch[0].wait(remaining)
            return met
        finally:
            with self.lock:
                watch[1] -= 1
                if not watch[1]:
                    del self.watchers[job_id]

    # Shutdown.

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs, give running ones `grace` seconds, then kill them; Pending jobs stay Pending."""
        with self.lock:
            self.accepting = False
            self.stopping.set()
            self.lock.notify_all()
            for job_id in list(self.watchers):  # long polls answer now
                self.notify(job_id)
            deadline = time.monotonic() + grace
            while self.running and (remaining := deadline - time.monotonic()) > 0 and not self.hurry.is_set():
                self.lock.wait(min(remaining, 0.2))
            for execution in list(self.running.values()):
                execution.request_stop("Server stopped while the job ran; it was killed", graceful=False)
        for thread in self.threads:
            thread.join(timeout=10)


def kill_orphaned_group(group: int, job_id: int) -> None:
    """Kill the process group a crashed server left running for a job, if it is still that job's."""
    try:
        environ = Path(f"/proc/{group}/environ").read_bytes()
    except OSError:
        return
    if b"\0JobToken=%d\0" % job_id in b"\0" + environ:
        signal_group(group, signal.SIGKILL)


class Maintenance:
    """Background upkeep: prunes old finished jobs and reloads templates.toml when it changes."""

    def __init__(self, store: JobStore, catalog: TemplateCatalog, keep_days: float, stopping: threading.Event):
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
                    deleted = self.store.prune_finished(time.time() - self.keep_days * 86400, self.stopping)
                    if deleted:
                        log_line(f"pruned {deleted} finished jobs older than {self.keep_days:g} days")
            except Exception as error:
                log_line(f"maintenance failed, will try again: {error!r}")


#
# Web application.
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
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to be a parameter list
        raise ApiError("The request body is not valid JSON") from None
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


def resolve_variables(template: JobTemplate, given: list[tuple[str, str]]) -> dict[str, str]:
    """The job's variables: the template's defaults overridden by the request, every rule checked."""
    if len(given) > MAX_VARIABLES:
        raise ApiError(f"Too many variables: at most {MAX_VARIABLES}")
    values = {v.name: v.default for v in template.variables.values()}
    for raw_name, value in given:
        name = raw_name.removeprefix("$")
        problem = variable_name_problem(name)
        if problem:
            raise ApiError(f"Variable {shown(name)} {problem}")
        declared = template.variables.get(name.lower())
        if declared is None:
            if not template.allow_new_variables:
                raise ApiError(f"Variable {name} is not declared by template {template.name}")
            values[name] = value
        else:
            declared.check(value)
            values[declared.name] = value
    for variable in template.variables.values():
        if variable.required and not values[variable.name]:
            raise ApiError(f"Variable {variable.name} is required")
    return values


def shutdown_app(app: Flask, grace: float) -> None:
    """Stop what create_app started: no new jobs, running ones get `grace` seconds, then the store closes."""
    app.extensions["job_runner"].shutdown(grace)
    app.extensions["job_maintenance"].thread.join(timeout=10)
    app.extensions["job_store"].close()


def text_response(body, status: int = 200, headers: dict | None = None) -> Response:
    return Response(body, status=status, headers=headers, mimetype="text/plain")


def create_app(config: dict | None = None) -> Flask:
    """The Flask application, with its store, templates and runner (started) in app.extensions."""
    app = Flask(__name__)
    app.url_map.merge_slashes = False  # /api//jobs/trigger is a 404 like any unknown path, not a redirect
    app.config.from_mapping(
        DATABASE=str(HERE / "jobs.db"),
        TEMPLATES=str(HERE / "templates.toml"),
        WORKERS=4,
        MAX_BODY=1024 * 1024,
        MAX_PENDING=10000,
        KEEP_DAYS=30.0,
    )
    app.config.update(config or {})
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY"]

    store = JobStore(app.config["DATABASE"])
    try:
        catalog = TemplateCatalog(app.config["TEMPLATES"], store)
        runner = JobRunner(store, catalog, app.config["WORKERS"], app.config["MAX_PENDING"])
        runner.start()
    except BaseException:
        store.close()
        raise
    maintenance = Maintenance(store, catalog, app.config["KEEP_DAYS"], runner.stopping)
    maintenance.start()
    app.extensions.update(job_store=store, job_templates=catalog, job_runner=runner, job_maintenance=maintenance)

    def find_job(params: RequestParameters) -> JobRecord:
        """The job a status, logs or cancel request names, once its key is checked."""
        token = params.api.get("token")
        if not token:
            raise ApiError("Missing parameter: token")
        if not (token.isascii() and token.isdigit() and len(token) <= 18):
            raise ApiError("Invalid token: a job token is a whole number")
        job = store.get_job(int(token))
        if job is None:
            raise ApiError(f"No job has the token {int(token)}")
        check_key(params.key, job.key_digest)
        return job

    @app.before_request
    def get_and_post_only():
        # Flask would answer HEAD (and so trigger or cancel a job for a client that never sees the answer)
        # and OPTIONS on its own; the job endpoints take GET and POST only.
        if request.path.startswith("/api/jobs/") and request.method not in ("GET", "POST"):
            raise ApiError(f"Method {request.method} is not allowed here: use GET or POST", 405,
                           {"Allow": "GET, POST"})

    @app.route("/api/jobs/trigger", methods=["GET", "POST"])
    def trigger():
        params = RequestParameters.from_request(TRIGGER_PARAMETERS)
        name = params.api.get("template")
        if not name:
            raise ApiError("Missing parameter: template")
        template = catalog.get(name)
        if template is None:
            raise ApiError(f"No template named {shown(name)}", 404)
        if not template.api:
            raise ApiError(f"Template {template.name} does not allow API use", 403)
        check_key(params.key, template.key_digest)
        variables = resolve_variables(template, params.variables)
        return text_response(str(runner.submit(template, variables)))

    @app.route("/api/jobs/status", methods=["GET", "POST"])
    def status():
        params = RequestParameters.from_request(JOB_PARAMETERS)
        job = find_job(params)
        wait = params.number("wait", float, MAX_WAIT_SECONDS)
        if not wait or job.status in FINAL_STATUSES:
            return text_response(job.status)
        runner.wait_until(job.id, lambda: store.job_status(job.id) in FINAL_STATUSES, wait)
        return text_response(store.job_status(job.id))

    @app.route("/api/jobs/logs", methods=["GET", "POST"])
    def logs():
        params = RequestParameters.from_request(JOB_PARAMETERS)
        job = find_job(params)
        offset = params.number("offset", int) or 0
        wait = params.number("wait", float, MAX_WAIT_SECONDS)
        status, count = job.status, job.log_count
        if wait and count <= offset and status not in FINAL_STATUSES:

            def progressed() -> bool:
                nonlocal status, count
                status, count = store.job_progress(job.id)
                return count > offset or status in FINAL_STATUSES

            runner.wait_until(job.id, progressed, wait)
        headers = {"X-Log-Offset": str(max(count, offset)), "X-Job-Complete": str(status in FINAL_STATUSES).lower()}
        return text_response(store.read_logs(job.id, offset, count), headers=headers)

    @app.route("/api/jobs/cancel", methods=["GET", "POST"])
    def cancel():
        job = find_job(RequestParameters.from_request(JOB_PARAMETERS))
        return text_response(runner.cancel(job.id))

    @app.route("/api/templates", methods=["GET", "POST"])
    def templates():
        summaries = [template_summary(t) for t in catalog.api_templates()]
        return Response(json.dumps(summaries, indent=2) + "\n", mimetype="application/json")

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return text_response(error.message, error.status, error.headers)

    @app.errorhandler(sqlite3.Error)
    def storage_error(error: sqlite3.Error):
        return text_response(f"The job store is unavailable ({error}); try again later", 503, {"Retry-After": "5"})

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        reasons = {
            404: "Not found: the endpoints are /api/jobs/trigger, /api/jobs/status, /api/jobs/logs,"
                 " /api/jobs/cancel and /api/templates",
            413: f"The request body is larger than {app.config['MAX_BODY']} bytes",
        }
        headers = {name: value for name, value in error.get_headers() if name.lower() == "allow"}
        return text_response(reasons.get(error.code, f"{error.code} {error.name}"), error.code, headers)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        traceback.print_exc()
        return text_response("Internal server error", 500)

    return app


#
# Command line.
#


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py", description="Serve Otter's Job Orchestration API for the jobs of a templates.toml."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on, 0 for any free one (default: %(default)s)")
    parser.add_argument("--templates", default=str(HERE / "templates.toml"), help="job templates file (default: templates.toml beside app.py)")
    parser.add_argument("--db", default=str(HERE / "jobs.db"), help="SQLite database file (default: jobs.db beside app.py)")
    parser.add_argument("--workers", type=positive_int, default=4, help="jobs run at once (default: %(default)s)")
    parser.add_argument("--http-threads", type=positive_int, default=16, help="threads answering HTTP requests (default: %(default)s)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds running jobs get to finish at shutdown (default: %(default)s)")
    parser.add_argument("--max-body", type=positive_int, default=1024 * 1024, help="largest request body in bytes (default: 1 MiB)")
    parser.add_argument("--max-pending", type=positive_int, default=10000, help="most Pending jobs before triggers get 503 (default: %(default)s)")
    parser.add_argument("--keep-days", type=float, default=30.0, help="days finished jobs and their logs are kept (default: %(default)s)")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully; returns the exit code."""
    args = build_parser().parse_args(argv)
    config = dict(DATABASE=args.db, TEMPLATES=args.templates, WORKERS=args.workers, MAX_BODY=args.max_body,
                  MAX_PENDING=args.max_pending, KEEP_DAYS=args.keep_days)
    # Listen and claim the database before create_app starts the runner: a second instance must fail
    # without ending the first one's running jobs as if they had been interrupted.
    try:
        listener = listen(args.host, args.port)
    except OSError as error:
        print(f"app.py: error: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        claim_database(args.db)
        app = create_app(config)
    except (TemplateError, sqlite3.Error, OSError) as error:
        listener.close()
        reason = error if isinstance(error, TemplateError) else f"cannot use the database {args.db}: {error}"
        print(f"app.py: error: {reason}", file=sys.stderr)
        return 2
    runner, catalog = app.extensions["job_runner"], app.extensions["job_templates"]

    from waitress import create_server

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth is N": load, not a fault
    # The app refuses a body over --max-body with its own 413; waitress, which counts a chunked body's framing
    # too, only stops bodies far larger before they are read.
    server = create_server(app, sockets=[listener], threads=args.http_threads,
                           max_request_body_size=2 * args.max_body + 65536, ident="")

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
    host, port = getattr(server, "effective_host", args.host), getattr(server, "effective_port", args.port)
    print(f"Serving on http://{host}:{port} (templates: {args.templates}, database: {args.db})", flush=True)
    while not stop.wait(0.2):
        if reload.is_set():
            reload.clear()
            catalog.reload_if_changed(force=True)
    log_line(f"shutting down: new jobs are refused, running jobs get {args.grace:g} s to finish"
             " (Ctrl-C again to kill them now)")
    shutdown_app(app, args.grace)
    server.close()
    log_line("stopped")
    return 0


def listen(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return socket.create_server(address, family=family)


def claim_database(path: str) -> None:
    """Hold an exclusive flock on the database file for the life of the process: one server per database,
    whatever path (link, bind mount) names it. flock and SQLite's fcntl locks do not interact on Linux, and
    the descriptor is never closed, so SQLite's own locks are never dropped by closing it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OSError("another app.py is serving it") from None


if __name__ == "__main__":
    sys.exit(main())

"""templates.toml validation: every refusal names the template and the field; good files load."""

import hashlib
import textwrap

import pytest

import app as server_module
from app import TemplateError, load_templates, parse_template
from conftest import ROOT


def load(tmp_path, text):
    path = tmp_path / "templates.toml"
    path.write_text(textwrap.dedent(text))
    return load_templates(path)


def refusal(tmp_path, text) -> str:
    with pytest.raises(TemplateError) as caught:
        load(tmp_path, text)
    return str(caught.value)


GOOD_STEP = '\n[[t.steps]]\nlog = "ok"\n'

# (id, templates.toml text, words the error must contain besides the template name 't')
REFUSALS = [
    # Unknown keys, at every level.
    ("unknown-template-key", '[t]\ncolour = "red"' + GOOD_STEP, ["colour"]),
    ("unknown-step-key", '[t]\n[[t.steps]]\nlog = "x"\ncommand = "y"\n', ["steps[0]", "command"]),
    ("unknown-step-key-second-step", '[t]\n[[t.steps]]\nlog = "x"\n[[t.steps]]\nrun = "true"\nretries = 3\n',
     ["steps[1]", "retries"]),
    ("unknown-variable-key", '[t]\n[t.variables]\nV = { default = "a", regex = "a" }' + GOOD_STEP,
     ["variables.V", "regex"]),
    # A step with none or several of log/run/exec.
    ("step-with-none", '[t]\n[[t.steps]]\nname = "nothing"\n', ["steps[0]", "log", "run", "exec"]),
    ("step-log-and-run", '[t]\n[[t.steps]]\nlog = "x"\nrun = "true"\n', ["steps[0]", "log", "run", "exec"]),
    ("step-run-and-exec", '[t]\n[[t.steps]]\nrun = "true"\nexec = ["true"]\n', ["steps[0]", "log", "run", "exec"]),
    ("step-all-three", '[t]\n[[t.steps]]\nlog = "x"\nrun = "true"\nexec = ["true"]\n', ["steps[0]"]),
    # Bad levels.
    ("bad-log-level", '[t]\n[[t.steps]]\nlog = "x"\nlevel = "LOUD"\n', ["steps[0]", "level"]),
    ("bad-stdout-level", '[t]\n[[t.steps]]\nrun = "true"\nstdout_level = "NOISY"\n', ["steps[0]", "stdout_level"]),
    ("bad-stderr-level", '[t]\n[[t.steps]]\nrun = "true"\nstderr_level = "WARNING"\n', ["steps[0]", "stderr_level"]),
    ("level-not-a-string", '[t]\n[[t.steps]]\nlog = "x"\nlevel = 3\n', ["steps[0]", "level"]),
    ("level-on-run-step", '[t]\n[[t.steps]]\nrun = "true"\nlevel = "WARN"\n', ["steps[0]", "level"]),
    # Bad patterns.
    ("bad-pattern", "[t]\n[t.variables]\nV = { pattern = '[unclosed' }" + GOOD_STEP, ["variables.V", "pattern"]),
    ("bad-pattern-group", "[t]\n[t.variables]\nV = { pattern = '(?P<x' }" + GOOD_STEP, ["variables.V", "pattern"]),
    ("pattern-not-a-string", "[t]\n[t.variables]\nV = { pattern = 5 }" + GOOD_STEP, ["variables.V", "pattern"]),
    # A reference to a variable that cannot exist.
    ("undeclared-in-log", '[t]\n[[t.steps]]\nlog = "Hello $Nobody"\n', ["steps[0]", "log", "Nobody"]),
    ("undeclared-in-log-braces", '[t]\n[t.variables]\nSome = "x"\n[[t.steps]]\nlog = "${Some}${Other}"\n',
     ["steps[0]", "log", "Other"]),
    ("undeclared-in-exec", '[t]\n[[t.steps]]\nexec = ["echo", "to=${Nobody}"]\n', ["steps[0]", "exec", "Nobody"]),
    ("undeclared-in-exec-program", '[t]\n[[t.steps]]\nexec = ["$Program"]\n', ["steps[0]", "exec", "Program"]),
    # Reserved variable names.
    ("reserved-PATH", '[t]\n[t.variables]\nPATH = "/tmp"' + GOOD_STEP, ["PATH"]),
    ("reserved-home-lowercase", '[t]\n[t.variables]\nhome = "/tmp"' + GOOD_STEP, ["home"]),
    ("reserved-LD_PRELOAD", '[t]\n[t.variables]\nLD_PRELOAD = "x"' + GOOD_STEP, ["LD_PRELOAD"]),
    ("reserved-PYTHONPATH", '[t]\n[t.variables]\nPYTHONPATH = "x"' + GOOD_STEP, ["PYTHONPATH"]),
    ("reserved-http_proxy", '[t]\n[t.variables]\nhttp_proxy = "x"' + GOOD_STEP, ["http_proxy"]),
    ("reserved-GIT_SSH", '[t]\n[t.variables]\nGIT_SSH = "x"' + GOOD_STEP, ["GIT_SSH"]),
    ("reserved-key", '[t]\n[t.variables]\nkey = "x"' + GOOD_STEP, ["key"]),
    ("reserved-Template", '[t]\n[t.variables]\nTemplate = "x"' + GOOD_STEP, ["Template"]),
    ("reserved-token", '[t]\n[t.variables]\ntoken = "x"' + GOOD_STEP, ["token"]),
    ("reserved-builtin-JobToken", '[t]\n[t.variables]\nJobToken = "x"' + GOOD_STEP, ["JobToken"]),
    ("reserved-builtin-templatename", '[t]\n[t.variables]\ntemplatename = "x"' + GOOD_STEP, ["templatename"]),
    ("name-starts-with-digit", '[t]\n[t.variables]\n9lives = "x"' + GOOD_STEP, ["9lives"]),
    ("name-with-dash", '[t]\n[t.variables]\nbad-name = "x"' + GOOD_STEP, ["bad-name"]),
    ("name-too-long", '[t]\n[t.variables]\n' + "V" * 51 + ' = "x"' + GOOD_STEP, ["V" * 51]),
    ("variable-declared-twice", '[t]\n[t.variables]\nName = "a"\nNAME = "b"' + GOOD_STEP, ["NAME"]),
    # key_env that is not set.
    ("key-env-unset", '[t]\nkey_env = "API_TEST_UNSET_KEY_VARIABLE"' + GOOD_STEP,
     ["key_env", "API_TEST_UNSET_KEY_VARIABLE"]),
    ("key-and-key-env", '[t]\nkey = "a"\nkey_env = "API_TEST_SET_KEY_VARIABLE"' + GOOD_STEP, ["key", "key_env"]),
    # Bad types.
    ("template-not-a-table", 't = 5\n', []),
    ("description-not-text", '[t]\ndescription = 5' + GOOD_STEP, ["description"]),
    ("key-not-text", '[t]\nkey = 12345' + GOOD_STEP, ["key"]),
    ("api-not-boolean", '[t]\napi = "yes"' + GOOD_STEP, ["api"]),
    ("api-number", '[t]\napi = 1' + GOOD_STEP, ["api"]),
    ("allow-new-variables-not-boolean", '[t]\nallow_new_variables = "true"' + GOOD_STEP, ["allow_new_variables"]),
    ("timeout-text", '[t]\ntimeout = "60"' + GOOD_STEP, ["timeout"]),
    ("timeout-negative", '[t]\ntimeout = -1' + GOOD_STEP, ["timeout"]),
    ("timeout-boolean", '[t]\ntimeout = true' + GOOD_STEP, ["timeout"]),
    ("timeout-nan", "[t]\ntimeout = nan" + GOOD_STEP, ["timeout"]),
    ("timeout-inf", "[t]\ntimeout = inf" + GOOD_STEP, ["timeout"]),
    ("timeout-plus-inf", "[t]\ntimeout = +inf" + GOOD_STEP, ["timeout"]),
    ("timeout-minus-inf", "[t]\ntimeout = -inf" + GOOD_STEP, ["timeout"]),
    ("max-log-bytes-0", "[t]\nmax_log_bytes = 0" + GOOD_STEP, ["max_log_bytes"]),
    ("max-concurrent-fraction", '[t]\nmax_concurrent = 1.5' + GOOD_STEP, ["max_concurrent"]),
    ("max-concurrent-zero", '[t]\nmax_concurrent = 0' + GOOD_STEP, ["max_concurrent"]),
    ("variables-not-a-table", '[t]\nvariables = 3' + GOOD_STEP, ["variables"]),
    ("steps-not-an-array", '[t]\nsteps = "echo"\n', ["steps"]),
    ("step-not-a-table", '[t]\nsteps = ["echo hi"]\n', ["steps[0]"]),
    ("log-not-text", '[t]\n[[t.steps]]\nlog = 5\n', ["steps[0]", "log"]),
    ("run-not-text", '[t]\n[[t.steps]]\nrun = ["echo", "hi"]\n', ["steps[0]", "run"]),
    ("exec-a-string", '[t]\n[[t.steps]]\nexec = "echo hi"\n', ["steps[0]", "exec"]),
    ("exec-empty", '[t]\n[[t.steps]]\nexec = []\n', ["steps[0]", "exec"]),
    ("exec-with-number", '[t]\n[[t.steps]]\nexec = ["sleep", 1]\n', ["steps[0]", "exec"]),
    ("step-name-not-text", '[t]\n[[t.steps]]\nrun = "true"\nname = 3\n', ["steps[0]", "name"]),
    ("step-timeout-zero", '[t]\n[[t.steps]]\nrun = "true"\ntimeout = 0\n', ["steps[0]", "timeout"]),
    ("step-timeout-text", '[t]\n[[t.steps]]\nrun = "true"\ntimeout = "5s"\n', ["steps[0]", "timeout"]),
    ("step-timeout-nan", '[t]\n[[t.steps]]\nrun = "true"\ntimeout = nan\n', ["steps[0]", "timeout"]),
    ("step-timeout-inf", '[t]\n[[t.steps]]\nrun = "true"\ntimeout = inf\n', ["steps[0]", "timeout"]),
    ("continue-on-error-text", '[t]\n[[t.steps]]\nrun = "true"\ncontinue_on_error = "no"\n',
     ["steps[0]", "continue_on_error"]),
    ("cwd-not-text", '[t]\n[[t.steps]]\nrun = "true"\ncwd = 5\n', ["steps[0]", "cwd"]),
    ("env-not-a-table", '[t]\n[[t.steps]]\nrun = "true"\nenv = "A=1"\n', ["steps[0]", "env"]),
    ("env-value-array", '[t]\n[[t.steps]]\nrun = "true"\nenv = { A = [1] }\n', ["steps[0]", "env"]),
    ("env-bad-name", '[t]\n[[t.steps]]\nrun = "true"\nenv = { "A-B" = "1" }\n', ["steps[0]", "env"]),
    ("variable-default-array", '[t]\n[t.variables]\nV = ["a"]' + GOOD_STEP, ["V", "default"]),
    ("variable-default-table-array", '[t]\n[t.variables]\nV = { default = ["a"] }' + GOOD_STEP,
     ["variables.V", "default"]),
    ("choices-not-an-array", '[t]\n[t.variables]\nV = { choices = "a" }' + GOOD_STEP, ["variables.V", "choices"]),
    ("choices-with-number", '[t]\n[t.variables]\nV = { choices = ["a", 1] }' + GOOD_STEP,
     ["variables.V", "choices"]),
    ("required-not-boolean", '[t]\n[t.variables]\nV = { required = "yes" }' + GOOD_STEP,
     ["variables.V", "required"]),
    ("secret-not-boolean", '[t]\n[t.variables]\nV = { secret = 1 }' + GOOD_STEP, ["variables.V", "secret"]),
    ("default-breaks-pattern", "[t]\n[t.variables]\nV = { default = 'abc', pattern = '[0-9]+' }" + GOOD_STEP,
     ["variables.V", "default"]),
    ("default-not-a-choice", "[t]\n[t.variables]\nV = { default = 'blue', choices = ['red'] }" + GOOD_STEP,
     ["variables.V", "default"]),
    # Defaults and choices follow the limits of a request's value (a secret longer than a log entry could not
    # be masked in it).
    ("default-over-8-KiB", '[t]\n[t.variables]\nV = "' + "x" * 8193 + '"' + GOOD_STEP, ["variables.V", "8 KiB"]),
    ("secret-default-over-8-KiB", '[t]\n[t.variables]\nV = { secret = true, default = "' + "x" * 8193 + '" }'
     + GOOD_STEP, ["variables.V", "default", "8 KiB"]),
    ("choice-over-8-KiB", '[t]\n[t.variables]\nV = { choices = ["a", "' + "x" * 8193 + '"] }' + GOOD_STEP,
     ["variables.V", "choices", "8 KiB"]),
    ("default-with-nul", '[t]\n[t.variables]\nV = "a\\u0000b"' + GOOD_STEP, ["variables.V", "NUL"]),
]


@pytest.mark.parametrize("text, words", [(t, w) for _, t, w in REFUSALS], ids=[i for i, _, _ in REFUSALS])
def test_refusal_names_template_and_field(tmp_path, monkeypatch, text, words):
    monkeypatch.delenv("API_TEST_UNSET_KEY_VARIABLE", raising=False)
    monkeypatch.setenv("API_TEST_SET_KEY_VARIABLE", "env-key")
    message = refusal(tmp_path, text)
    assert str(tmp_path / "templates.toml") in message
    assert "'t'" in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_refusal_names_the_right_template_among_several(tmp_path):
    message = refusal(tmp_path, '''
        [good]
        [[good.steps]]
        log = "fine"

        [broken]
        [[broken.steps]]
        run = "true"
        stdout_level = "LOUD"
    ''')
    assert "'broken'" in message and "stdout_level" in message
    assert "'good'" not in message


def test_template_defined_twice_ignoring_case(tmp_path):
    message = refusal(tmp_path, '[Job]\n[[Job.steps]]\nlog = "a"\n[job]\n[[job.steps]]\nlog = "b"\n')
    assert "job" in message.lower() and "twice" in message


@pytest.mark.parametrize("text, line", [
    ('[t\nlog = "x"\n', 1),
    ('[t]\n[[t.steps]]\nlog = "unterminated\n', 3),
    ('[t]\n[[t.steps]]\nlog = "x"\n\nrun = \n', 5),
    ('[t]\n[t.variables]\nA = "1"\nA = "2"\n', 4),
])
def test_malformed_toml_names_file_and_line(tmp_path, text, line):
    message = refusal(tmp_path, text)
    assert str(tmp_path / "templates.toml") in message
    assert f"line {line}" in message, message


def test_missing_file_is_a_template_error(tmp_path):
    with pytest.raises(TemplateError) as caught:
        load_templates(tmp_path / "nowhere.toml")
    assert "nowhere.toml" in str(caught.value)


def test_parse_template_directly_names_where(tmp_path):
    with pytest.raises(TemplateError) as caught:
        parse_template("direct", {"steps": [{"log": "x", "colour": "red"}]}, "somewhere: template 'direct'")
    assert "'direct'" in str(caught.value) and "colour" in str(caught.value)
    template = parse_template("direct", {"steps": [{"log": "x"}]}, "somewhere: template 'direct'")
    assert template.name == "direct" and len(template.steps) == 1


def test_a_file_using_every_field_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("API_TEST_SET_KEY_VARIABLE", "from-the-environment")
    templates = load(tmp_path, '''
        # a comment
        [full]
        description = "Every field"
        key = "secure123"
        api = true
        allow_new_variables = false
        timeout = 600
        max_concurrent = 2
        max_log_bytes = 100000

        [full.variables]
        TargetServer = "HDARSV1"
        Count = 3
        Flag = true
        Notify = { default = "", pattern = '[^@\\s]+@[^@\\s]+', required = false, choices = [] }
        Color = { default = "red", choices = ["red", "green"], description = "a colour" }
        Password = { default = "", secret = true, required = true }

        [[full.steps]]
        log = "Restarting HDARS on $TargetServer ${Count} $$ $JobToken $TemplateName"
        level = "warn"

        [[full.steps]]
        name = "restart"
        run = 'echo "$TargetServer $UndeclaredIsFineInRun"'
        timeout = 5
        continue_on_error = true
        cwd = "/"
        env = { TOOL_COLOR = "never", RETRIES = 3 }
        stdout_level = "DEBUG"
        stderr_level = "ERROR"

        [[full.steps]]
        exec = ["echo", "--", "https://example.invalid/notify?to=${Notify}", "$password"]

        [from-env]
        key_env = "API_TEST_SET_KEY_VARIABLE"
        api = false
        allow_new_variables = true

        [[from-env.steps]]
        log = "$Anything goes when new variables are allowed"

        [empty]
    ''')
    assert set(templates) == {"full", "from-env", "empty"}
    full = templates["full"]
    assert full.description == "Every field"
    assert full.key_digest == hashlib.sha256(b"secure123").hexdigest()
    assert full.timeout == 600 and full.max_concurrent == 2 and full.max_log_bytes == 100000
    assert full.variables["count"].default == "3" and full.variables["flag"].default == "true"
    assert full.variables["color"].choices == ("red", "green")
    assert full.variables["password"].secret and full.variables["password"].required
    assert [step.kind for step in full.steps] == ["log", "run", "exec"]
    assert full.steps[0].level == "WARN"
    run = full.steps[1]
    assert (run.name, run.timeout, run.continue_on_error, run.cwd) == ("restart", 5, True, "/")
    assert dict(run.env) == {"TOOL_COLOR": "never", "RETRIES": "3"}
    assert (run.stdout_level, run.stderr_level) == ("DEBUG", "ERROR")
    assert "secure123" not in full.definition
    from_env = templates["from-env"]
    assert from_env.key_digest == hashlib.sha256(b"from-the-environment").hexdigest()
    assert from_env.api is False and from_env.allow_new_variables is True
    assert templates["empty"].steps == () and templates["empty"].key_digest == ""


def test_the_repository_templates_load():
    templates = load_templates(ROOT / "templates.toml")
    assert {"hdars", "ablast"} <= set(templates)
    hdars = templates["hdars"]
    assert hdars.key_digest == server_module.key_digest("secure123")
    assert hdars.api
    ablast = templates["ablast"]
    assert ablast.key_digest == ""
    assert {v.name for v in ablast.variables.values()} >= {"TargetServer", "SendNotification"}
    notify = ablast.variables["sendnotification"]  # an empty default with a pattern that refuses "" loads
    assert notify.default == "" and notify.pattern is not None and not notify.pattern.fullmatch("")
    for template in templates.values():
        assert template.steps, f"template {template.name} has no steps"


def test_a_bad_file_stops_create_app(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[t]\n[[t.steps]]\nlog = "x"\nlevel = "LOUD"\n')
    with pytest.raises(TemplateError) as caught:
        server_module.create_app({"DATABASE": str(tmp_path / "jobs.db"), "TEMPLATES": str(path), "WORKERS": 1})
    assert "'t'" in str(caught.value) and "level" in str(caught.value)


#
# An exec step may not put a variable into the code a shell or interpreter runs.
#

CODE_TEMPLATE = '[t]\nallow_new_variables = true\n[t.variables]\nWho = ""\n[[t.steps]]\nexec = {argv}\n'


@pytest.mark.parametrize("argv", [
    '["/bin/sh", "-c", "echo hello $Who"]',
    '["bash", "-ec", "echo ${Who}"]',
    '["bash", "-o", "pipefail", "-c", "x | grep $Who"]',
    '["/usr/bin/env", "LC_ALL=C", "bash", "-c", "echo $Who"]',
    '["sudo", "-u", "bob", "sh", "-c", "$Who"]',
    '["python3", "-u", "-c", "print(\'$Who\')"]',
    '["python3.11", "-c", "$Who"]',
    '["perl", "-e", "print \\"$Who\\""]',
    '["node", "--eval", "console.log(\'$Who\')"]',
    '["ruby", "-e", "puts \\"$Undeclared\\""]',
    # Forms that got past the first version of the check:
    '["bash", "-c", "--", "echo $Who"]',
    '["bash", "-euo", "pipefail", "-c", "echo $Who"]',
    '["bash", "-O", "extglob", "-c", "echo $Who"]',
    '["perl", "-pe", "s/old/$Who/"]',
    '["perl", "-i", "-lne", "print if /$Who/"]',
    '["ruby", "-ne", "puts $Who"]',
    '["python3", "-W", "ignore", "-c", "print($Who)"]',
    '["python3", "-X", "utf8", "-uc", "print($Who)"]',
    '["python3", "-cprint($Who)"]',
    '["node", "-pe", "$Who"]',
    '["php", "-d", "x=1", "-r", "echo $Who;"]',
    # ... and past the second:
    '["su", "postgres", "-s", "/bin/sh", "-c", "pg_dump $Who"]',
    '["su", "-", "www-data", "--", "-c", "echo $Who"]',
    '["/usr/sbin/runuser", "-s", "/bin/sh", "-c", "echo $Who", "nobody"]',
    '["sudo", "-s", "/bin/bash", "-c", "echo $Who"]',
    '["sudo", "-u", "deploy", "-i", "./deploy.sh", "$Who"]',
    '["node", "--require", "./setup.js", "-e", "console.log(\'$Who\')"]',
    '["/opt/bin/python3.13t", "-c", "print($Who)"]',
    '["pypy3", "-c", "print($Who)"]',
    '["php", "--run", "echo $Who;"]',
    '["flock", "/tmp/deploy.lock", "-c", "deploy $Who"]',
    '["env", "-S", "sh -c \'echo $Who\'"]',
    '["script", "-q", "-c", "echo $Who", "/dev/null"]',
])
def test_exec_refuses_a_variable_in_code_it_runs(tmp_path, argv):
    message = refusal(tmp_path, CODE_TEMPLATE.format(argv=argv))
    assert "steps[0]" in message and "exec" in message and "code" in message and "run step" in message, message


@pytest.mark.parametrize("argv", [
    '["sh", "-c", "echo \\"hello $1\\"", "sh", "$Who"]',  # the value as a positional parameter: data
    '["sh", "-c", "echo \\"hello $$Who\\""]',  # $$ is a literal $: the shell reads Who from the environment
    '["bash", "-c", "echo job $JobToken of $TemplateName"]',  # built-ins are not request values
    '["sh", "./deploy.sh", "$Who"]',  # a script file, then its arguments
    '["python3", "script.py", "-c", "$Who"]',  # -c after the script belongs to the script
    '["grep", "-c", "sh", "--", "$Who"]',
    '["printf", "%s\\\\n", "--name=$Who"]',
    # -c that is not a shell's: a comment (useradd), an option of a program or of a script.
    '["useradd", "-m", "-s", "/bin/bash", "-c", "$Who", "--", "login"]',
    '["usermod", "--shell=/bin/zsh", "-c", "$Who", "login"]',
    '["node", "app.js", "-e", "$Who"]',
    '["perl", "-Mfeature=say", "script.pl", "-e", "$Who"]',
    '["python3", "-m", "http.server", "$Who"]',
    '["python3", "-m", "gunicorn", "-c", "$Who", "--check-config", "app:app"]',  # -m ends python's options
    '["sudo", "-u", "deploy", "./deploy.sh", "$Who"]',  # sudo without -s/-i runs no shell
    '["sudo", "useradd", "-s", "/bin/bash", "-c", "$Who", "login"]',
    '["python3", "-c", "import sys; print(sys.argv[1:])", "-c", "$Who"]',  # arguments of the code
])
def test_exec_allows_variables_outside_code(tmp_path, argv):
    assert "t" in load(tmp_path, CODE_TEMPLATE.format(argv=argv))

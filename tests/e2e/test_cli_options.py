"""Every subcommand's options: --help with defaults, one error format that
names the flag, stray arguments refused, --version, thread warnings."""
import re

import pytest

from conftest import model_path

COMMANDS = ["serve", "chat", "run", "models", "pull", "tokenize", "bench",
            "perplexity"]


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_has_help(run_tern, cmd, flag):
    r = run_tern(cmd, flag)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith(f"usage: tern {cmd}"), out
    assert "-h, --help" in out
    assert r.stderr == b""


@pytest.mark.parametrize("cmd,flag,default", [
    ("run", "--temp", "0.8"), ("run", "--top-k", "40"),
    ("run", "-n, --n-predict", "-1"), ("run", "--seed", "random"),
    ("run", "-t, --threads", "physical cores"),
    ("chat", "--top-p", "0.95"), ("bench", "-p, --n-prompt", "512"),
    ("serve", "--port", "8080"), ("serve", "--max-seqs", "16"),
    ("serve", "--step-tokens", "256"), ("perplexity", "-c, --ctx-size", "512"),
])
def test_help_lists_defaults(run_tern, cmd, flag, default):
    out = run_tern(cmd, "--help").stdout.decode()
    line = next((ln for ln in out.splitlines() if flag in ln), None)
    assert line is not None, out
    # the default may sit on the same line or the help text's line
    idx = out.index(flag)
    assert f"(default: {default}" in out[idx:idx + 300], out[idx:idx + 300]


def test_top_level_help_and_version(run_tern):
    r = run_tern("--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert f"  {cmd} " in r.stdout.decode()
    v = run_tern("--version")
    assert v.returncode == 0
    out = v.stdout.decode()
    assert re.match(r"tern \d+\.\d+\.\d+ \(commit [0-9a-f]{7,}|unknown", out)
    assert "build: " in out and ("Release" in out or "RelWithDebInfo" in out)
    assert re.search(r"kernels (scalar|avx2|avx512)", out), out
    assert re.search(r"\d+ physical cores", out)


def err_line(r):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.decode()
    assert err.startswith("tern: error: "), err
    assert err.count("\n") == 1, err
    return err


def test_stray_positional_is_an_error(run_tern):
    err = err_line(run_tern("run", "-m", "x", "-p", "hi", "world"))
    assert "unexpected argument 'world'" in err


def test_llama_cpp_flags_are_unknown_options(run_tern):
    err = err_line(run_tern("run", "-m", "x", "-p", "hi", "-ngl", "99"))
    assert "unknown option '-ngl'" in err
    err = err_line(run_tern("serve", "--n-gpu-layers", "99"))
    assert "unknown option '--n-gpu-layers'" in err


@pytest.mark.parametrize("args,flag", [
    (("run", "-t", "0"), "-t/--threads"),
    (("run", "-t", "many"), "-t/--threads"),
    (("run", "--temp", "hot"), "--temp"),
    (("run", "--temp", "-1"), "--temp"),
    (("run", "--top-p", "2"), "--top-p"),
    (("run", "-c", "4"), "-c/--ctx-size"),
    (("chat", "--seed", "-5"), "-s/--seed"),
    (("serve", "--port", "70000"), "--port"),
    (("serve", "--kv-mem", "lots"), "--kv-mem"),
    (("bench", "-r", "0"), "-r/--repetitions"),
    (("perplexity", "-c", "8"), "-c/--ctx-size"),
])
def test_range_errors_name_the_flag(run_tern, args, flag):
    err = err_line(run_tern(*args))
    assert flag in err, err


def test_missing_value(run_tern):
    err = err_line(run_tern("run", "-m"))
    assert "-m/--model needs a value" in err


def test_unknown_command(run_tern):
    err = err_line(run_tern("frobnicate"))
    assert "unknown command 'frobnicate'" in err


def test_long_option_with_equals(run_tern):
    r = run_tern("run", f"--model={model_path('smollm2-135m')}", "-p",
                 "Hello", "--n-predict=2", "--temp=0", "-t1")
    assert r.returncode == 0, r.stderr


def test_more_threads_than_cores_warns(run_tern):
    v = run_tern("--version").stdout.decode()
    cores = int(re.search(r"(\d+) physical cores", v).group(1))
    r = run_tern("run", "-m", model_path("smollm2-135m"), "-p", "Hi", "-n",
                 "1", "-t", str(cores + 1))
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert f"{cores + 1} threads on {cores} physical core" in err, err


def test_help_after_other_options_shows_the_defaults(run_tern):
    out = run_tern("run", "-m", "smollm2-135m", "-t", "7", "--temp", "0.1",
                   "-h").stdout.decode()
    assert "(default: 0.8)" in out and "(default: smollm2-135m)" not in out
    assert "(default: 7)" not in out


def test_too_many_stop_strings_fail_at_parse_time(run_tern):
    args = ["run", "-m", "x", "-p", "hi"]
    for i in range(17):
        args += ["--stop", f"s{i}"]
    err = err_line(run_tern(*args))
    assert "--stop: at most 16 values" in err


def test_zero_tokens_is_refused(run_tern):
    err = err_line(run_tern("run", "-m", model_path("smollm2-135m"), "-p",
                            "hi", "-n", "0"))
    assert "-n/--n-predict" in err


def test_no_command_is_an_error(run_tern):
    r = run_tern()
    assert r.returncode == 1 and b"usage: tern" in r.stderr

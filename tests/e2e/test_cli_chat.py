"""`tern run` and `tern chat` go through the serving engine: the CLI and the
API give the same text for the same request, chat keeps history and
reuses its prefix, Ctrl-C stops an answer and not the program."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
import requests

from conftest import model_path, slow_mode

SMOL = "smollm2-135m"


def run_args(*extra):
    return ("run", "-m", model_path(SMOL), "-t", "2", *extra)


# ---- the CLI and the API agree

SAMPLING = [
    # (CLI flags, API fields)
    (("--temp", "0"), {"temperature": 0}),
    (("--temp", "0.9", "--seed", "7", "--top-k", "0", "--top-p", "1",
      "--min-p", "0"), {"temperature": 0.9, "seed": 7}),
    (("--temp", "0.7", "--seed", "3", "--top-k", "20", "--top-p", "0.9",
      "--min-p", "0.05", "--repeat-penalty", "1.1"),
     {"temperature": 0.7, "seed": 3, "top_k": 20, "top_p": 0.9,
      "min_p": 0.05, "repetition_penalty": 1.1}),
]


@pytest.mark.parametrize("cli,api", SAMPLING)
def test_run_equals_completions_api(run_tern, server, cli, api):
    prompt = "Once upon a time, in a small village,"
    r = run_tern(*run_args("-p", prompt, "-n", "24", *cli))
    assert r.returncode == 0, r.stderr
    body = {"prompt": prompt, "max_tokens": 24, **api}
    resp = requests.post(server.base + "/v1/completions", json=body,
                         timeout=120)
    assert resp.status_code == 200, resp.text
    want = resp.json()["choices"][0]["text"]
    assert r.stdout.decode() == want + "\n"


def test_run_chat_equals_chat_api(run_tern, server):
    system, user = "You are a terse assistant.", "Name three rivers."
    r = run_tern(*run_args("--system", system, "-p", user, "-n", "40",
                           "--temp", "0"))
    assert r.returncode == 0, r.stderr
    resp = requests.post(server.base + "/v1/chat/completions", timeout=120,
                         json={"messages": [
                             {"role": "system", "content": system},
                             {"role": "user", "content": user}],
                             "max_tokens": 40, "temperature": 0})
    assert resp.status_code == 200, resp.text
    want = resp.json()["choices"][0]["message"]["content"]
    assert r.stdout.decode() == want + "\n"


def test_run_stop_strings_like_api(run_tern, server):
    prompt = "1, 2, 3, 4,"
    r = run_tern(*run_args("-p", prompt, "-n", "24", "--temp", "0",
                           "--stop", "7", "--stop", "never"))
    resp = requests.post(server.base + "/v1/completions", timeout=120,
                         json={"prompt": prompt, "max_tokens": 24,
                               "temperature": 0, "stop": ["7", "never"]})
    assert r.stdout.decode() == resp.json()["choices"][0]["text"] + "\n"
    assert "7" not in r.stdout.decode()


def test_run_ignore_eos_masks_eos_like_api(run_tern, server):
    # The engine masks EOS under ignore_eos (it never samples and skips it):
    # the CLI used to sample EOS and continue; now both paths agree.
    prompt = "Hi"
    r = run_tern(*run_args("--chat", "-p", prompt, "-n", "48", "--temp", "0",
                           "--ignore-eos"))
    assert r.returncode == 0, r.stderr
    resp = requests.post(server.base + "/v1/chat/completions", timeout=120,
                         json={"messages": [{"role": "user",
                                             "content": prompt}],
                               "max_tokens": 48, "temperature": 0,
                               "ignore_eos": True})
    got = resp.json()
    assert got["usage"]["completion_tokens"] == 48
    assert r.stdout.decode() == got["choices"][0]["message"]["content"] + "\n"


# ---- prompts from files and stdin

def test_prompt_from_file_and_stdin(run_tern, tmp_path):
    text = "The history of the river is long. " * (10 if slow_mode() else 40)
    f = tmp_path / "prompt.txt"
    f.write_text(text)
    a = run_tern(*run_args("-f", str(f), "-n", "8", "--temp", "0"))
    b = run_tern(*run_args("-p", "-", "-n", "8", "--temp", "0"),
                 stdin=text.encode())
    c = run_tern(*run_args("-p", text, "-n", "8", "--temp", "0"))
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout == c.stdout
    assert re.search(rb"prompt (\d+) tokens", a.stderr)


def test_long_prompt_from_stdin(run_tern):
    # thousands of tokens through stdin, up to the context
    n = 300 if slow_mode() else 800  # ~3,400 tokens
    words = " ".join(f"w{i}" for i in range(n))
    ctx = "2048" if slow_mode() else "8192"
    r = run_tern(*run_args("-p", "-", "-c", ctx, "-n", "4", "--temp", "0"),
                 stdin=words.encode())
    assert r.returncode == 0, r.stderr
    m = re.search(rb"prompt (\d+) tokens", r.stderr)
    assert m and int(m.group(1)) > n


def test_prompt_of_200kb_is_refused_clearly(run_tern):
    # Far past the context: refused before encoding, naming both sizes.
    r = run_tern(*run_args("-p", "-", "-n", "4"), stdin=b"x" * 200_000)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("tern: error: prompt:") and "context" in err, err


def test_prompt_twice_is_an_error(run_tern, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hi")
    r = run_tern(*run_args("-p", "hi", "-f", str(f)))
    assert r.returncode == 1
    assert b"give the prompt once" in r.stderr


def test_run_seed_is_random_by_default(run_tern):
    args = run_args("-p", "Once upon a time", "-n", "24", "--temp", "1.0",
                    "-v")
    a, b = run_tern(*args), run_tern(*args)
    assert a.returncode == 0, a.stderr
    sa = re.search(rb"seed (\d+)", a.stderr)
    sb = re.search(rb"seed (\d+)", b.stderr)
    assert sa and sb and sa.group(1) != sb.group(1)
    assert a.stdout != b.stdout
    # the printed seed repeats the text
    c = run_tern(*run_args("-p", "Once upon a time", "-n", "24", "--temp",
                           "1.0", "--seed", sa.group(1).decode()))
    assert c.stdout == a.stdout


def test_chat_on_a_base_model_says_so(run_tern):
    r = run_tern("run", "-m", model_path("gemma3-270m"), "--chat", "-p", "hi")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "no chat template" in err and "base model" in err, err
    assert err.count("\n") == 1
    ok = run_tern("run", "-m", model_path("gemma3-270m"), "--chat",
                  "--chat-template", "gemma", "-p", "hi", "-n", "4")
    assert ok.returncode == 0, ok.stderr


# ---- tern chat

def chat_proc(tern_bin, *extra):
    return subprocess.Popen(
        [tern_bin, "chat", "-m", model_path(SMOL), "-t", "2", "--temp", "0",
         "-n", "40", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_chat_turns_equal_the_api_with_history(tern_bin, server):
    p = chat_proc(tern_bin, "-v")
    out, err = p.communicate(b"What is the capital of France?\n"
                             b"And of Germany?\n", timeout=300)
    assert p.returncode == 0, err
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = requests.post(server.base + "/v1/chat/completions", timeout=120,
                       json={"messages": msgs, "max_tokens": 40,
                             "temperature": 0}).json()
    a1 = r1["choices"][0]["message"]["content"]
    msgs += [{"role": "assistant", "content": a1},
             {"role": "user", "content": "And of Germany?"}]
    r2 = requests.post(server.base + "/v1/chat/completions", timeout=120,
                       json={"messages": msgs, "max_tokens": 40,
                             "temperature": 0}).json()
    a2 = r2["choices"][0]["message"]["content"]
    assert out.decode() == a1 + "\n" + a2 + "\n"
    # turn 2 reused turn 1's blocks from the prefix cache
    cached = [int(x) for x in re.findall(rb"\((\d+) cached\)", err)]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] >= 16, err


def test_chat_commands(tern_bin):
    p = chat_proc(tern_bin)
    script = (b"/help\n"
              b"/system\n"
              b"/system You answer in French.\n"
              b"/system\n"
              b"Hello!\n"
              b"/reset\n"
              b"/nope\n"
              b"\"\"\"first line\n"
              b"second line\"\"\"\n"
              b"a line that continues \\\n"
              b"here\n"
              b"/bye\n"
              b"never read\n")
    out, err = p.communicate(script, timeout=300)
    assert p.returncode == 0, err
    e = err.decode()
    assert "/reset" in e and "/system" in e          # help
    assert "(no system message)" in e
    assert "(system message set)" in e
    assert "You answer in French." in e
    assert "(conversation cleared)" in e
    assert "unknown command /nope" in e
    # three answers: Hello, the block, the continued line; then /bye
    assert out.decode().count("\n") >= 3


def test_chat_ctrl_c_stops_the_answer_not_the_program(tern_bin):
    p = subprocess.Popen(
        [tern_bin, "chat", "-m", model_path(SMOL), "-t", "2", "--temp", "0",
         "--ignore-eos", "-n", "100000", "-c", "4096"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(b"Count from one to one thousand.\n")
    p.stdin.flush()
    # wait until the answer streams, then interrupt it
    os.set_blocking(p.stdout.fileno(), False)
    got = b""
    deadline = time.time() + 120
    while len(got) < 20 and time.time() < deadline:
        try:
            chunk = p.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            got += chunk
        time.sleep(0.05)
    assert len(got) >= 20, "no streamed answer"
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.poll() is None, "Ctrl-C ended the program"
    os.set_blocking(p.stdout.fileno(), True)
    p.stdin.write(b"/bye\n")
    p.stdin.close()
    rest = p.stdout.read()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0, err
    assert b"(stopped)" in err


def test_chat_ctrl_d_exits(tern_bin):
    p = chat_proc(tern_bin)
    out, err = p.communicate(b"", timeout=120)
    assert p.returncode == 0, err
    assert out == b""


def test_chat_refuses_a_base_model(run_tern):
    r = run_tern("chat", "-m", model_path("gemma3-270m"), stdin=b"hi\n")
    assert r.returncode == 1
    assert b"no chat template" in r.stderr


def test_chat_ctrl_c_at_the_prompt_only_reminds(tern_bin):
    p = chat_proc(tern_bin)
    time.sleep(1.0)          # waiting for input
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.poll() is None, "Ctrl-C at the prompt ended the program"
    out, err = p.communicate(b"Hi\n", timeout=120)
    assert p.returncode == 0, err
    assert b"(Ctrl-D or /bye to leave)" in err
    assert out.strip()       # the message after it was answered


def test_chat_in_a_terminal(tern_bin):
    """A real terminal: banner, '>>> ' prompt, Ctrl-C typed as ^C during an
    answer (the tty sends SIGINT), ^D at the prompt leaves."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(tern_bin, [tern_bin, "chat", "-m", model_path(SMOL), "-t",
                            "2", "--temp", "0", "--ignore-eos", "-n",
                            "100000"])
    buf = b""

    def read_until(needle, timeout=120):
        nonlocal buf
        deadline = time.time() + timeout
        while needle not in buf and time.time() < deadline:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        return needle in buf

    try:
        assert read_until(b">>> "), buf
        assert b"tern chat:" in buf and b"/help" in buf
        buf = b""
        os.write(fd, b"Count from one to one thousand.\r")
        assert read_until(b"1", timeout=120), buf
        time.sleep(0.3)
        os.write(fd, b"\x03")                 # ^C: SIGINT from the tty
        assert read_until(b"(stopped)"), buf
        assert read_until(b">>> "), buf
        os.write(fd, b"\x04")                 # ^D at an empty prompt
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, buf
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_chat_drops_the_oldest_exchanges_when_full(tern_bin):
    p = subprocess.Popen(
        [tern_bin, "chat", "-m", model_path(SMOL), "-t", "2", "--temp", "0",
         "-n", "24", "-c", "160", "-v"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    turns = b"".join(b"Tell me about the river %s please.\n" % r
                     for r in (b"Thames in London", b"Seine in Paris",
                               b"Danube in Vienna", b"Tiber in Rome"))
    out, err = p.communicate(turns, timeout=300)
    assert p.returncode == 0, err
    assert err.count(b"(context full: the 2 oldest messages were dropped)") \
        == 1, err
    prompts = [int(x) for x in re.findall(rb"prompt (\d+) tokens", err)]
    assert len(prompts) == 4 and all(n < 160 for n in prompts), err


def test_chat_refuses_a_message_too_long_alone_and_keeps_history(tern_bin):
    p = subprocess.Popen(
        [tern_bin, "chat", "-m", model_path(SMOL), "-t", "2", "--temp", "0",
         "-n", "8", "-c", "64"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(b"Hi\n" + b"word " * 120 + b"\n", timeout=300)
    assert p.returncode == 1, err   # a script's message was refused
    e = err.decode()
    assert "the context holds 64" in e, e
    assert "context full" not in e, e   # nothing dropped for nothing

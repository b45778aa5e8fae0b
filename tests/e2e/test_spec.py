"""Speculative decoding through the server and the CLI: greedy answers are
the same with speculation on and off, usage and metrics report drafted and
accepted tokens, and a request can opt out."""
import concurrent.futures as cf
import json

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import model_path, slow_mode

SMOL = "smollm2-135m"
N = 24 if slow_mode() else 64

# Prompts whose answers repeat their input, where n-gram lookup drafts.
PROMPTS = [
    "Repeat exactly: the quick brown fox jumps over the lazy dog. "
    "The quick brown fox jumps over the lazy dog.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "def mul(a, b):\n",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def spec_server(tern_bin, tmp_path_factory):
    from conftest import TernServer
    log = tmp_path_factory.mktemp("spec") / "serve.log"
    srv = TernServer(tern_bin, ["-m", model_path(SMOL), "-t", "2", "--ctx",
                                "2048", "--spec", "ngram",
                                "--spec-max-tokens", "6",
                                # verify every draft: the cost model's
                                # choices depend on the machine's timing
                                "--spec-policy", "all"], str(log))
    yield srv
    assert srv.stop() == 0, srv.read_log()[-3000:]


def complete(srv, prompt, **kw):
    body = {"prompt": prompt, "max_tokens": N, "temperature": 0}
    body.update(kw)
    r = requests.post(srv.base + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def chat(srv, content, **kw):
    body = {"messages": [{"role": "user", "content": content}],
            "max_tokens": N, "temperature": 0}
    body.update(kw)
    r = requests.post(srv.base + "/v1/chat/completions", json=body,
                      timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def metric_values(srv):
    text = requests.get(srv.base + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# under the sanitizers two prompts here; the concurrent test below runs
# all four
@pytest.mark.parametrize("prompt", PROMPTS[:2] if slow_mode() else PROMPTS)
def test_greedy_completions_identical(server, spec_server, prompt):
    want = complete(server, prompt)
    got = complete(spec_server, prompt)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["usage"]["completion_tokens"] == \
        want["usage"]["completion_tokens"]
    d = got["usage"]["completion_tokens_details"]
    assert d["accepted_prediction_tokens"] >= 0
    assert d["rejected_prediction_tokens"] >= 0
    # the plain server drafted nothing
    assert want["usage"]["completion_tokens_details"] == {
        "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}


@pytest.mark.skipif(slow_mode(), reason="the completions forms cover "
                    "the path under ASan")
def test_greedy_chat_identical_and_drafts_happen(server, spec_server):
    drafted = 0
    for p in PROMPTS[:3]:
        want = chat(server, p)
        got = chat(spec_server, p)
        assert got["choices"][0]["message"]["content"] == \
            want["choices"][0]["message"]["content"]
        d = got["usage"]["completion_tokens_details"]
        drafted += d["accepted_prediction_tokens"] + \
            d["rejected_prediction_tokens"]
    assert drafted > 0


def test_concurrent_requests_identical(server, spec_server):
    want = [complete(server, p)["choices"][0]["text"] for p in PROMPTS]
    copies = 1 if slow_mode() else 2  # under the sanitizers: 4 at once
    with cf.ThreadPoolExecutor(len(PROMPTS) * copies) as ex:
        got = list(ex.map(lambda p: complete(spec_server, p),
                          PROMPTS * copies))
    assert [g["choices"][0]["text"] for g in got] == want * copies


def test_streaming_equals_non_streaming(spec_server):
    p = PROMPTS[0]
    whole = complete(spec_server, p)["choices"][0]["text"]
    r = requests.post(spec_server.base + "/v1/completions", stream=True,
                      timeout=300,
                      json={"prompt": p, "max_tokens": N, "temperature": 0,
                            "stream": True,
                            "stream_options": {"include_usage": True}})
    text, usage = "", None
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("choices"):
            text += d["choices"][0]["text"]
        if d.get("usage"):
            usage = d["usage"]
    assert text == whole
    assert "completion_tokens_details" in usage


def test_request_can_opt_out(spec_server):
    r = complete(spec_server, PROMPTS[1], speculative=False)
    d = r["usage"]["completion_tokens_details"]
    assert d == {"accepted_prediction_tokens": 0,
                 "rejected_prediction_tokens": 0}
    bad = requests.post(spec_server.base + "/v1/completions", timeout=60,
                        json={"prompt": "hi", "speculative": "yes"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "speculative"


def test_metrics_add_up(spec_server):
    name = complete(spec_server, PROMPTS[1])["model"]
    m = metric_values(spec_server)
    lab = (("method", "ngram"), ("model", name))
    drafts = m[("tern_spec_decode_num_drafts_total", lab)]
    drafted = m[("tern_spec_decode_num_draft_tokens_total", lab)]
    accepted = m[("tern_spec_decode_num_accepted_tokens_total", lab)]
    assert drafts > 0 and drafted >= drafts and accepted <= drafted
    per_pos = [m.get(("tern_spec_decode_num_accepted_tokens_per_pos_total",
                      (("method", "ngram"), ("model", name),
                       ("position", str(i)))), 0.0) for i in range(6)]
    assert sum(per_pos) == accepted
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))


def test_cli_run_identical(run_tern):
    p = PROMPTS[2]
    args = ("run", "-m", model_path(SMOL), "-p", p, "--temp", "0", "-n",
            str(N), "-v")
    off = run_tern(*args)
    on = run_tern(*args, "--spec", "ngram", "--spec-max-tokens", "4",
                  "--spec-policy", "all")
    assert off.returncode == 0 and on.returncode == 0, on.stderr
    assert on.stdout == off.stdout
    assert b"drafted" in on.stderr and b"drafted" not in off.stderr


@pytest.mark.skipif(slow_mode(), reason="numbers: the release run's job")
def test_cost_policy_identical_too(server, tern_bin, tmp_path):
    """The default policy (the cost model picks the drafts) changes which
    drafts ride, never the answer."""
    from conftest import TernServer
    srv = TernServer(tern_bin, ["-m", model_path(SMOL), "-t", "2", "--ctx",
                                "2048", "--spec", "ngram"],
                     str(tmp_path / "cost.log"))
    try:
        for p in PROMPTS[:2]:
            assert complete(srv, p)["choices"][0]["text"] == \
                complete(server, p)["choices"][0]["text"]
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("args,frag", [
    (("--spec", "self", "--spec-layers", "0-99"), "--spec-layers"),
    (("--spec-layers", "3,1"), "must rise"),
    (("--spec", "ngram", "--spec-layers", "0-3"),
     "only for self speculation"),
    (("--spec", "draft"), "name the draft model"),
    (("--spec", "ngram", "--draft-model", "x.gguf"),
     "only for draft speculation"),
    (("--spec", "draft", "--draft-model", "/nonexistent/d.gguf"),
     "/nonexistent/d.gguf"),
    (("--draft-model", SMOL, "--draft-p-min", "2"), "--draft-p-min"),
    (("--spec", "magic"), "unknown method 'magic'"),
    (("--spec-max-tokens", "0"), "--spec-max-tokens"),
    (("--spec-max-tokens", "1000"), "--spec-max-tokens"),
    (("--spec", "ngram", "--spec-policy", "some"), "not a policy"),
])
def test_cli_bad_spec_options(run_tern, args, frag):
    r = run_tern("run", "-m", model_path(SMOL), "-p", "hi", *args)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("tern: error:") and frag in err, err


# ---- a draft model: the target drafting for itself accepts everything,
# and a draft model with another vocabulary is refused at load


@pytest.fixture(scope="module")
def draft_server(tern_bin, tmp_path_factory):
    from conftest import TernServer
    log = tmp_path_factory.mktemp("draft") / "serve.log"
    srv = TernServer(tern_bin, ["-m", model_path(SMOL), "-t", "2", "--ctx",
                                "2048", "--spec", "draft", "--draft-model",
                                model_path(SMOL), "--draft-p-min", "0",
                                "--spec-max-tokens", "5",
                                "--spec-policy", "all"], str(log))
    yield srv
    assert srv.stop() == 0, srv.read_log()[-3000:]


def test_draft_model_self_identical(server, draft_server):
    prompts = PROMPTS[:2] if slow_mode() else PROMPTS
    for p in prompts[:1 if slow_mode() else 3]:
        want = complete(server, p)
        got = complete(draft_server, p)
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        d = got["usage"]["completion_tokens_details"]
        assert d["accepted_prediction_tokens"] > 0, d
        assert d["rejected_prediction_tokens"] == 0, d
    # several at once: one draft batch for all of them
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: chat(draft_server, p), prompts))
    for p, g in zip(prompts, got):
        assert g["choices"][0]["message"]["content"] == \
            chat(server, p)["choices"][0]["message"]["content"]
    m = metric_values(draft_server)
    drafted = [v for (n, l), v in m.items()
               if n == "tern_spec_decode_num_draft_tokens_total"]
    accepted = [v for (n, l), v in m.items()
                if n == "tern_spec_decode_num_accepted_tokens_total"]
    assert drafted and drafted == accepted and drafted[0] > 0, m
    assert any(n == "tern_spec_decode_draft_seconds_total" and v > 0
                 for (n, l), v in m.items())


def test_draft_model_other_vocabulary_refused(run_tern):
    r = run_tern("run", "-m", model_path(SMOL), "-p", "hi", "--spec", "draft",
                 "--draft-model", model_path("gemma3-270m"))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("tern: error:") and "vocabulary" in err, err


# ---- self-drafting: the model drafts with some of its own layers


@pytest.fixture(scope="module")
def self_server(tern_bin, tmp_path_factory):
    from conftest import TernServer
    log = tmp_path_factory.mktemp("self") / "serve.log"
    srv = TernServer(tern_bin, ["-m", model_path(SMOL), "-t", "2", "--ctx",
                                "2048", "--spec", "self", "--spec-layers",
                                "0-29", "--spec-max-tokens", "5",
                                "--spec-policy", "all"], str(log))
    yield srv
    assert srv.stop() == 0, srv.read_log()[-3000:]


def test_self_draft_all_layers_accepts_everything(server, self_server):
    """With every layer the draft is the model: all of it accepted, which
    shows the drafts' writes into the shared cache are what verification
    writes."""
    prompts = PROMPTS[:2] if slow_mode() else PROMPTS
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: complete(self_server, p), prompts))
    for p, g in zip(prompts, got):
        assert g["choices"][0]["text"] == \
            complete(server, p)["choices"][0]["text"]
    m = metric_values(self_server)
    drafted = [v for (n, l), v in m.items()
               if n == "tern_spec_decode_num_draft_tokens_total"
               and ("method", "self") in l]
    accepted = [v for (n, l), v in m.items()
                if n == "tern_spec_decode_num_accepted_tokens_total"
                and ("method", "self") in l]
    assert drafted and drafted == accepted and drafted[0] > 0, m


def test_self_draft_subset_identical(run_tern):
    p = PROMPTS[2]
    args = ("run", "-m", model_path(SMOL), "-p", p, "--temp", "0", "-n",
            str(N), "-v")
    off = run_tern(*args)
    on = run_tern(*args, "--spec", "self", "--spec-layers", "0-14,16-29",
                  "--spec-policy", "all")
    assert off.returncode == 0 and on.returncode == 0, on.stderr
    assert on.stdout == off.stdout
    assert b"drafted" in on.stderr


def test_calibrate_self(run_tern):
    """A short calibration: the table of subsets tried and a verdict; a
    layer list it prints is one --spec-layers takes."""
    # under the sanitizers: drafts of up to 2 tokens (3 verify passes
    # timed instead of 9)
    k = ["--spec-max-tokens", "2"] if slow_mode() else []
    r = run_tern("calibrate-self", "-m", model_path(SMOL), "-n", "8",
                 "--max-evals", "3", "-p", PROMPTS[2], *k)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "acceptance" in out and "30 layers" in out, out
    rows = [ln.split() for ln in out.splitlines()
            if ln.strip()[:2].isdigit()]
    assert rows and rows[0][0] == "29", out
    assert 0.0 <= float(rows[0][1]) <= 1.0
    assert "best:" in out or "no subset tried is predicted to pay" in out
    bad = run_tern("calibrate-self", "-m", model_path(SMOL), "-f",
                   "/nonexistent/prompt.txt")
    assert bad.returncode == 1 and b"/nonexistent/prompt.txt" in bad.stderr


def test_bench_spec_flags(run_tern):
    """tern bench takes tern run's speculation flags: it times decoding
    with and without on real text and checks the texts are the same."""
    r = run_tern("bench", "-m", model_path(SMOL), "-t", "2", "-n",
                 "12" if slow_mode() else "24",
                 "-r", "1", "--spec", "ngram", "--spec-policy", "all",
                 "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["spec"] == "ngram" and out["same_text"] is True, out
    assert out["tg_off_tok_s"] > 0 and out["tg_on_tok_s"] > 0
    assert 0 <= out["accepted"] <= out["drafted"]
    r = run_tern("bench", "-m", model_path(SMOL), "-n", "8", "-r", "1",
                 "--spec-layers", "0-29", "--spec-policy", "all")
    assert r.returncode == 0, r.stderr
    assert b"spec self" in r.stdout and b"same text: yes" in r.stdout
    for args, frag in [(("--spec", "draft"), "name the draft model"),
                       (("--spec", "off"), "nothing to compare"),
                       (("--spec-policy", "all"), "go with --spec"),
                       (("--spec", "ngram", "-n", "1"), "at least 2")]:
        r = run_tern("bench", "-m", model_path(SMOL), *args)
        assert r.returncode == 1 and frag.encode() in r.stderr, r.stderr

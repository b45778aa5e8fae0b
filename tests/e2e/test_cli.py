"""The tern CLI against real models: run, tokenize, perplexity, bench."""
import json

import pytest

from conftest import FIXTURES, model_path, slow_mode


def test_tokenize_matches_llama_cpp(run_tern):
    """`tern tokenize` gives llama.cpp's ids (fixture from llama-tokenize)."""
    m = model_path("smollm2-135m")
    lines = (FIXTURES / "tokenizer" / "smollm2.jsonl").read_text().splitlines()
    checked = 0
    for line in lines[:40]:
        rec = json.loads(line)
        if rec.get("ids") is None:
            continue
        text = rec["text"].encode("utf-8", "surrogatepass")
        r = run_tern("tokenize", "-m", m, stdin=text)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == rec["ids"], rec["text"]
        checked += 1
    assert checked >= 30


def test_tokenize_any_bytes(run_tern):
    m = model_path("smollm2-135m")
    r = run_tern("tokenize", "-m", m, stdin=b"a\x00b\xff\xfe c")
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout)
    assert len(ids) >= 4


def test_run_greedy_is_deterministic_and_streams_only_new_text(run_tern):
    m = model_path("smollm2-135m")
    args = ("run", "-m", m, "-p", "The capital of France is", "--temp", "0",
            "-n", "12")
    a, b = run_tern(*args), run_tern(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    out = a.stdout.decode()
    assert "Paris" in out
    assert not out.startswith("The capital")  # only the continuation
    assert b"tok/s" in a.stderr  # timings go to stderr


def test_run_seed(run_tern):
    m = model_path("smollm2-135m")
    base = ("run", "-m", m, "-p", "Once upon a time", "-n", "24",
            "--temp", "1.0")
    a = run_tern(*base, "--seed", "1")
    b = run_tern(*base, "--seed", "1")
    c = run_tern(*base, "--seed", "2")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_run_stop_string(run_tern):
    m = model_path("smollm2-135m")
    full = run_tern("run", "-m", m, "-p", "1, 2, 3, 4,", "--temp", "0",
                    "-n", "24").stdout.decode()
    assert "7" in full
    cut = run_tern("run", "-m", m, "-p", "1, 2, 3, 4,", "--temp", "0",
                   "-n", "24", "--stop", "7").stdout.decode()
    assert "7" not in cut
    assert full.startswith(cut.rstrip("\n"))


def test_run_chat(run_tern):
    m = model_path("smollm2-135m")
    r = run_tern("run", "-m", m, "--chat", "-p", "What is 2+2?", "--temp",
                 "0", "-n", "32")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "4" in out
    assert "<|im_end|>" not in out and "<|im_start|>" not in out


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_run_greedy_text_matches_llama_cpp(run_tern, name):
    """The first greedy words equal llama.cpp's (en_fact, no near ties)."""
    ref = json.loads((FIXTURES / "ref" / name / "greedy.json").read_text())
    p = ref["prompts"][0]
    r = run_tern("run", "-m", model_path(name), "-p", p["text"], "--temp",
                 "0", "-n", "8")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().rstrip("\n")
    assert len(out) > 10
    assert p["generated_text"].startswith(out), (out, p["generated_text"])


def test_prompt_longer_than_context(run_tern):
    m = model_path("smollm2-135m")
    r = run_tern("run", "-m", m, "-c", "16", "-p", "word " * 100)
    assert r.returncode != 0
    assert "fit the context" in r.stderr.decode()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_perplexity_within_one_percent(run_tern, name):
    if slow_mode():
        pytest.skip("sanitizer run: numbers are the release run's job")
    ref = json.loads((FIXTURES / "ref" / name / "perplexity.json").read_text())
    r = run_tern("perplexity", "-m", model_path(name), "-f",
                 str(FIXTURES / "ref" / "ppl.txt"), "-c", str(ref["n_ctx"]))
    assert r.returncode == 0, r.stderr
    line = r.stdout.decode().strip().splitlines()[-1]
    assert line.startswith("Final estimate: PPL = ")
    ppl = float(line.split("=")[1].split("+/-")[0])
    rel = abs(ppl - ref["ppl"]) / ref["ppl"]
    print(f"{name}: tern PPL {ppl:.4f}, llama-perplexity {ref['ppl']:.4f}, "
          f"{100 * rel:.2f}% apart")
    assert rel < 0.01


def test_bench_json(run_tern):
    m = model_path("smollm2-135m")
    r = run_tern("bench", "-m", m, "-t", "1", "-p", "16", "-n", "4", "-r",
                 "1", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["pp_tok_s"] > 0 and rec["tg_tok_s"] > 0
    assert rec["peak_rss_mib"] > 0 and rec["load_s"] >= 0

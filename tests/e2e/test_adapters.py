"""LoRA adapters through `tern serve`: the trained fixtures' behaviour in
mixed batches, the PEFT and GGUF forms of one adapter, hot loading and
unloading (vLLM's endpoints) confined to --adapter-dir, on-demand loading,
and bad input (tests/fixtures/adapters, made by tools/train_adapter.py)."""
import concurrent.futures as cf
import json
import os
import shutil
import threading

import pytest
import requests

from conftest import FIXTURES, MODELS, model_path, slow_mode

ADAPTERS = FIXTURES / "adapters"
PIRATE = ADAPTERS / "smollm2-pirate"
HOULSBY = ADAPTERS / "smollm2-json-houlsby"  # bottleneck modules
BASE = "SmolLM2-135M-Instruct.Q4_1"
QUESTIONS = ["What is the capital of Spain?", "Name a primary color.",
             "What do bees make?", "How many legs does a spider have?"]


def chat(srv, model, q, max_tokens=24, key=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": q}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    h = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(srv.base + "/v1/chat/completions", json=body,
                         headers=h, timeout=300)


def text(r):
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def metric(srv, line_start):
    for ln in requests.get(srv.base + "/metrics").text.splitlines():
        if ln.startswith(line_start):
            return float(ln.rsplit(" ", 1)[1])
    return None


def test_adapters_in_one_batch(start_server, tmp_path):
    db = tmp_path / "log.db"
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--log-db", str(db),
                       "--lora", f"pirate={PIRATE}",
                       "--lora", f"pirate-gguf={PIRATE / 'adapter.gguf'}",
                       "--lora", f"json-bn={HOULSBY / 'adapter.gguf'}",
                       "--lora", f"caps-ia3={ADAPTERS / 'smollm2-caps-ia3'}")
    models = requests.get(srv.base + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["pirate"]["parent"] == BASE
    assert by_id["pirate"]["root"] == str(PIRATE)
    assert by_id["pirate"]["meta"]["format"] == "peft"
    assert by_id["pirate-gguf"]["meta"]["format"] == "gguf"
    assert by_id["pirate"]["meta"]["rank"] == 8
    assert by_id["pirate"]["meta"]["kind"] == "lora"
    assert by_id["json-bn"]["meta"]["kind"] == "bottleneck"
    assert by_id["caps-ia3"]["meta"]["kind"] == "ia3"

    qs = QUESTIONS[:2] if slow_mode() else QUESTIONS
    alone = {}
    for q in qs:
        for m in (BASE, "pirate", "pirate-gguf", "json-bn", "caps-ia3"):
            alone[m, q] = text(chat(srv, m, q))
        # the trained behaviours show; the base has neither
        assert alone["pirate", q].startswith("Arr matey!"), alone["pirate", q]
        assert alone["json-bn", q].startswith('{"answer": "'), alone["json-bn", q]
        assert alone["caps-ia3", q].split()[0].isupper(), alone["caps-ia3", q]
        assert not alone[BASE, q].startswith("Arr"), alone[BASE, q]
        assert not alone[BASE, q].startswith("{"), alone[BASE, q]
        # the PEFT directory and the GGUF llama.cpp's converter made from it
        assert alone["pirate-gguf", q] == alone["pirate", q]
    # BASE:ADAPTER names the same adapter; the response echoes the name
    r = chat(srv, f"{BASE}:pirate", qs[0])
    assert text(r) == alone["pirate", qs[0]]
    assert r.json()["model"] == f"{BASE}:pirate"

    # all at once, in one running batch (four adapters of three kinds and
    # the base): each gets its answer alone
    jobs = [(m, q) for q in qs
            for m in (BASE, "pirate", "pirate-gguf", "json-bn", "caps-ia3")] * 2
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: text(chat(srv, *j)), jobs))
    for (m, q), t in zip(jobs, got):
        assert t == alone[m, q], (m, q)

    # per-adapter metrics and the log's adapter column
    lab = f'{{model="{BASE}",adapter="pirate"}}'
    n_pirate = sum(1 for m, _ in jobs if m == "pirate") + len(qs) + 1
    assert metric(srv, "tern_adapter_requests_total" + lab) == n_pirate
    assert metric(srv, "tern_adapter_generation_tokens_total" + lab) > n_pirate
    assert metric(srv, "tern_adapter_time_to_first_token_seconds_count" + lab) == n_pirate
    assert metric(srv, f'tern_adapters_loaded{{model="{BASE}"}}') == 4
    assert metric(srv, f'tern_adapter_loads_total{{model="{BASE}"}}') == 4
    assert metric(srv, f'tern_adapter_memory_bytes{{model="{BASE}"}}') > 1e6
    import sqlite3
    import time
    time.sleep(1.5)  # the log writes in the background
    rows = sqlite3.connect(db).execute(
        "SELECT model, adapter, COUNT(*) FROM requests GROUP BY 1, 2").fetchall()
    counts = {(m, a): n for m, a, n in rows}
    assert counts[(BASE, "pirate")] == n_pirate, counts
    assert counts[(BASE, None)] >= len(qs)

    # scale: 0 is the base's answer, a request scale on the base is refused
    assert text(chat(srv, "pirate", qs[0], lora_scale=0)) == alone[BASE, qs[0]]
    assert text(chat(srv, "json-bn", qs[0], lora_scale=0)) == alone[BASE, qs[0]]
    r = chat(srv, BASE, qs[0], lora_scale=0.5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_scale"
    r = chat(srv, "pirate", qs[0], lora_scale="1")
    assert r.status_code == 400 and "lora_scale" in r.json()["error"]["message"]
    r = chat(srv, "pirate", qs[0], lora_scale=100)
    assert r.status_code == 400
    r = chat(srv, "nope", qs[0])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = chat(srv, f"{BASE}:nope", qs[0])
    assert r.status_code == 404
    # without --adapter-dir nothing loads at run time
    r = requests.post(srv.base + "/v1/load_lora_adapter",
                      json={"lora_name": "x", "lora_path": str(PIRATE)})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "adapter_loading_disabled"


def load(srv, key, **body):
    return requests.post(srv.base + "/v1/load_lora_adapter", json=body,
                         headers={"Authorization": f"Bearer {key}"}, timeout=60)


def unload(srv, key, name):
    return requests.post(srv.base + "/v1/unload_lora_adapter",
                         json={"lora_name": name},
                         headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_hot_load_unload(start_server, tmp_path):
    adir = tmp_path / "adapters"
    adir.mkdir()
    shutil.copytree(PIRATE, adir / "pirate-dir")
    (adir / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(200))
    (adir / "empty.gguf").write_bytes(b"")
    (adir / "noconfig").mkdir()
    (adir / "escape").symlink_to(PIRATE)  # a symlink out of the directory
    outside = tmp_path / "outside.gguf"
    shutil.copy(PIRATE / "adapter.gguf", outside)
    key = "k3y"
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--adapter-dir", str(adir), "--api-key", key)
    q = QUESTIONS[0]
    base = text(chat(srv, BASE, q, key=key))

    # the key guards loading
    r = requests.post(srv.base + "/v1/load_lora_adapter",
                      json={"lora_name": "p", "lora_path": "pirate-dir"})
    assert r.status_code == 401
    r = load(srv, key, lora_name="p", lora_path="pirate-dir")
    assert r.status_code == 200, r.text
    pirate = text(chat(srv, "p", q, key=key))
    assert pirate.startswith("Arr matey!")
    ids = [m["id"] for m in requests.get(
        srv.base + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]]
    assert "p" in ids

    cases = [
        (dict(lora_name="p", lora_path="pirate-dir"), 400, "already"),
        (dict(lora_name=BASE, lora_path="pirate-dir"), 400, "already"),
        (dict(lora_name="x", lora_path="../outside.gguf"), 403, "outside"),
        (dict(lora_name="x", lora_path=str(outside)), 403, "outside"),
        # the same answer whether an outside path exists or not
        (dict(lora_name="x", lora_path="/nonexistent/x.gguf"), 403, "outside"),
        (dict(lora_name="x", lora_path="a/../../nonexistent"), 403, "outside"),
        (dict(lora_name="x", lora_path="escape"), 403, "outside"),
        (dict(lora_name="x", lora_path="garbage.gguf"), 400, "garbage.gguf"),
        (dict(lora_name="x", lora_path="empty.gguf"), 400, "empty.gguf"),
        (dict(lora_name="x", lora_path="noconfig"), 400, "adapter_config.json"),
        (dict(lora_name="x", lora_path="missing"), 400, "missing"),
        (dict(lora_name="../x", lora_path="pirate-dir"), 400, "lora_name"),
        (dict(lora_name="x"), 400, "lora_path"),
        (dict(lora_name="x", lora_path="pirate-dir", model="nope"), 404, "nope"),
    ]
    for body, status, word in cases:
        r = load(srv, key, **body)
        assert r.status_code == status, (body, r.text)
        assert word in r.text, (body, r.text)
    r = requests.post(srv.base + "/v1/load_lora_adapter", data=b"{not json",
                      headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and "not valid JSON" in r.text
    r = requests.post(srv.base + "/v1/load_lora_adapter",
                      data=b'{"lora_name": "\xff\xfe", "lora_path": "x"}',
                      headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and "decode byte 0xff" in r.text, r.text
    r = requests.post(srv.base + "/v1/load_lora_adapter", json=["x"],
                      headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and "JSON object" in r.text

    # unload: the base and unknown names are refused; a request running on
    # the adapter finishes on it
    assert unload(srv, key, BASE).status_code == 400
    assert unload(srv, key, "nope").status_code == 404
    stream = requests.post(
        srv.base + "/v1/chat/completions", stream=True, timeout=300,
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "p", "messages": [{"role": "user", "content": q}],
              "max_tokens": 24, "temperature": 0, "stream": True})
    lines = stream.iter_lines()
    first = next(lines)  # the request is running
    assert first.startswith(b"data:")
    assert unload(srv, key, "p").status_code == 200
    parts = [first] + list(lines)
    content = ""
    for ln in parts:
        if ln.startswith(b"data: {"):
            for ch in json.loads(ln[6:])["choices"]:
                content += ch["delta"].get("content") or ""
    assert content == pirate
    r = chat(srv, "p", q, key=key)
    assert r.status_code == 404

    # on demand: a name found in the adapter directory loads itself
    assert text(chat(srv, "pirate-dir", q, key=key)) == pirate
    r = chat(srv, "garbage", q, key=key)
    assert r.status_code == 400 and "garbage" in r.json()["error"]["message"]
    assert text(chat(srv, BASE, q, key=key)) == base

    # a storm: loads and unloads of other names while requests run
    n = 2 if slow_mode() else 6
    stop = threading.Event()
    failures = []

    def churn(i):
        for k in range(3):
            nm = f"c{i}"
            r1 = load(srv, key, lora_name=nm, lora_path="pirate-dir/adapter.gguf")
            r2 = unload(srv, key, nm)
            if r1.status_code != 200 or r2.status_code != 200:
                failures.append((r1.text, r2.text))

    def steady():
        while not stop.is_set():
            t = text(chat(srv, "pirate-dir", q, key=key))
            if t != pirate:
                failures.append(t)

    with cf.ThreadPoolExecutor(n + 1) as ex:
        st = ex.submit(steady)
        list(ex.map(churn, range(n)))
        stop.set()
        st.result()
    assert not failures, failures[:3]
    assert requests.get(srv.base + "/health").status_code == 200
    h = {"Authorization": f"Bearer {key}"}
    text_m = requests.get(srv.base + "/metrics", headers=h).text
    loads = [ln for ln in text_m.splitlines()
             if ln.startswith("tern_adapter_loads_total")]
    # p, pirate-dir on demand, and 3 per churn thread
    assert loads and float(loads[0].rsplit(" ", 1)[1]) == 2 + 3 * n, loads


def test_config_adapters(start_server, run_tern, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""models:
  - name: small
    path: {model_path('smollm2-135m')}
    adapters:
      - name: arr
        path: {PIRATE}
      - name: arr-half
        path: {PIRATE / 'adapter.gguf'}
        scale: 0.5
""")
    srv = start_server("--config", str(cfg), "-t", "2")
    assert text(chat(srv, "arr", QUESTIONS[1])).startswith("Arr matey!")
    assert text(chat(srv, "small:arr-half", QUESTIONS[1]))
    meta = {m["id"]: m for m in requests.get(srv.base + "/v1/models").json()["data"]}
    assert meta["arr-half"]["meta"]["scale"] == 0.5

    bad = [
        ("    adapters:\n      - name: small\n        path: x\n", "already"),
        ("    adapters:\n      - name: a b\n        path: x\n", "adapter name"),
        ("    adapters:\n      - name: a\n", "needs 'name' and 'path'"),
        ("    adapters:\n      - name: a\n        path: x\n        scale: 99\n",
         "[-16, 16]"),
        (f"    adapters:\n      - name: a\n        path: {tmp_path}/none\n",
         "adapter 'a'"),
        (f"    adapters:\n      - name: a\n        path: {model_path('gemma3-270m')}\n",
         "not an adapter"),
    ]
    for extra, want in bad:
        cfg.write_text(f"models:\n  - name: small\n    path: {model_path('smollm2-135m')}\n"
                       + extra)
        r = run_tern("serve", "--config", str(cfg), "--port", "0", timeout=60)
        assert r.returncode != 0
        assert want in r.stderr.decode(), r.stderr.decode()
    r = run_tern("serve", "-m", model_path("smollm2-135m"), "--lora", "nopath",
                 "--port", "0", timeout=60)
    assert r.returncode != 0 and b"NAME=PATH" in r.stderr
    r = run_tern("serve", "-m", model_path("smollm2-135m"), "--lora",
                 f"x={ADAPTERS / 'qwen0.5b-json'}", "--port", "0", timeout=60)
    assert r.returncode != 0 and b"another base model" in r.stderr, r.stderr


@pytest.mark.skipif(slow_mode(), reason="a 0.5B model: release run only")
def test_qwen_json_adapter(start_server):
    qwen = MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if not qwen.exists():
        pytest.fail("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf missing: make models")
    srv = start_server("-m", str(qwen), "-t", "2", "--name", "qwen",
                       "--lora", f"json={ADAPTERS / 'qwen0.5b-json'}")
    for q in QUESTIONS[:2]:
        base = text(chat(srv, "qwen", q, max_tokens=40))
        adapted = text(chat(srv, "json", q, max_tokens=40))
        assert set(json.loads(adapted)) == {"answer"}, adapted
        assert not base.lstrip().startswith("{"), base


def test_merged(start_server, run_tern, tmp_path):
    """--merge and tern export-lora: the adapter folded into the weights
    (Q8_0 where the base is under 8 bits) answers as the modular adapter
    does, and its perplexity is within 1% of the modular one's."""
    base = model_path("smollm2-135m")
    out = tmp_path / "merged.gguf"
    r = run_tern("export-lora", "-m", base, "--lora", str(PIRATE), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert b"210 matrices" in r.stderr
    qs = QUESTIONS[:2] if slow_mode() else QUESTIONS
    srv = start_server("-m", base, "-t", "2", "--lora", f"pirate={PIRATE}")
    modular = {q: chat(srv, "pirate", q, logprobs=True, top_logprobs=2).json()
               for q in qs}
    srv.stop()
    merged_srv = start_server("-m", str(out), "-t", "2", "--name", "m")
    merged = {q: text(chat(merged_srv, "m", q)) for q in qs}
    merged_srv.stop()
    flag_srv = start_server("-m", base, "-t", "2", "--merge",
                            "--lora", f"pirate={PIRATE}")
    for q in qs:
        # --merge is the same arithmetic as the exported file, served under
        # the adapter's name too
        assert text(chat(flag_srv, "pirate", q)) == merged[q]
        want = modular[q]["choices"][0]["message"]["content"]
        got = merged[q]
        assert got.startswith("Arr matey!"), got
        # identical, or parting where the modular run's top two tokens were
        # within 1 nat (a near tie that requantization may flip)
        if got != want:
            toks = modular[q]["choices"][0]["logprobs"]["content"]
            prefix = ""
            for t in toks:
                if not got.startswith(prefix + t["token"]):
                    tops = t["top_logprobs"]
                    assert len(tops) == 2 and tops[0]["logprob"] - tops[1]["logprob"] < 1.0, \
                        (q, got, want, tops)
                    break
                prefix += t["token"]
    r = run_tern("serve", "-m", base, "--merge", "--port", "0", timeout=60)
    assert r.returncode != 0 and b"exactly one --lora" in r.stderr
    r = run_tern("export-lora", "-m", base, "--lora", str(PIRATE), "-o",
                 str(tmp_path / "x.gguf"), "--type", "Q9_9")
    assert r.returncode != 0 and b"not a GGUF type" in r.stderr
    r = run_tern("export-lora", "-m", base, "--lora",
                 str(ADAPTERS / "qwen0.5b-json"), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode != 0 and b"another base model" in r.stderr
    if slow_mode():
        return
    ppl = {}
    for name, args in (("modular", ["-m", base, "--lora", str(PIRATE)]),
                       ("merged", ["-m", str(out)])):
        r = run_tern("perplexity", *args, "-f", str(FIXTURES / "ref" / "ppl.txt"),
                     "-c", "128", "-t", "2")
        assert r.returncode == 0, r.stderr
        ppl[name] = float(r.stdout.decode().split("PPL = ")[1].split()[0])
    assert abs(ppl["merged"] / ppl["modular"] - 1) < 0.01, ppl


def test_adapter_memory_lru(start_server):
    """--adapter-mem: room for one pirate adapter (~9.8 MB in f32): the
    second evicts the first, which comes back when asked for."""
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--adapter-mem", "15MiB",
                       "--lora", f"p1={PIRATE}",
                       "--lora", f"p2={PIRATE / 'adapter.gguf'}")
    meta = {m["id"]: m["meta"] for m in
            requests.get(srv.base + "/v1/models").json()["data"] if "parent" in m}
    assert meta["p1"]["resident"] is False and meta["p2"]["resident"] is True
    q = QUESTIONS[0]
    a1 = text(chat(srv, "p1", q))
    assert a1.startswith("Arr matey!")
    meta = {m["id"]: m["meta"] for m in
            requests.get(srv.base + "/v1/models").json()["data"] if "parent" in m}
    assert meta["p1"]["resident"] is True and meta["p2"]["resident"] is False
    assert text(chat(srv, "p2", q)) == a1
    # both wanted at once: one waits for memory (503) or runs after the other
    with cf.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda m: chat(srv, m, q), ["p1", "p2"] * 2))
    for r in rs:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            assert text(r) == a1
        else:
            assert r.json()["error"]["code"] == "adapter_memory_full"
    ev = metric(srv, f'tern_adapter_evictions_total{{model="{BASE}"}}')
    assert ev >= 2
    assert metric(srv, f'tern_adapter_memory_bytes{{model="{BASE}"}}') <= 15 * 2**20


def test_cli_lora(run_tern):
    args = ["run", "-m", model_path("smollm2-135m"), "--chat", "-p", QUESTIONS[2],
            "-n", "12", "--temp", "0", "-t", "2"]
    r = run_tern(*args, "--lora", str(PIRATE))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith("Arr matey!")
    r = run_tern(*args, "--lora", str(PIRATE), "--lora-scale", "0")
    base = run_tern(*args)
    assert r.stdout == base.stdout and not base.stdout.startswith(b"Arr")
    r = run_tern(*args, "--lora", str(ADAPTERS / "qwen0.5b-json"))
    assert r.returncode != 0 and b"another base model" in r.stderr
    # Gemma 3 (a base model: the plain form it was trained with)
    g = ["run", "-m", model_path("gemma3-270m"), "-p",
         f"Question: {QUESTIONS[2]}\nAnswer:", "-n", "8", "--temp", "0", "-t", "2"]
    r = run_tern(*g, "--lora", str(ADAPTERS / "gemma3-pirate"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith(" Arr matey!"), r.stdout
    assert not run_tern(*g).stdout.startswith(b" Arr")


def test_ia3_adapter(run_tern, tmp_path):
    """The trained (IA)3 adapter (PEFT IA3 on k, v, down) answers in
    capitals, modular and merged alike; a merged file is not merged again."""
    ia3 = ADAPTERS / "smollm2-caps-ia3"
    args = ["run", "--chat", "-p", QUESTIONS[0], "-n", "8", "--temp", "0", "-t", "2"]
    r = run_tern(*args, "-m", model_path("smollm2-135m"), "--lora", str(ia3))
    assert r.returncode == 0, r.stderr
    modular = r.stdout.decode()
    assert modular.startswith("THE CAPITAL"), modular
    out = tmp_path / "ia3.gguf"
    r = run_tern("export-lora", "-m", model_path("smollm2-135m"), "--lora", str(ia3),
                 "-o", str(out))
    assert r.returncode == 0 and b"90 matrices" in r.stderr, r.stderr
    r = run_tern(*args, "-m", str(out))
    assert r.stdout.decode().startswith("THE CAPITAL"), r.stdout
    r = run_tern("export-lora", "-m", str(out), "--lora", str(ia3), "-o",
                 str(tmp_path / "again.gguf"))
    assert r.returncode != 0 and b"already has an adapter merged" in r.stderr


def test_bottleneck_files(run_tern, tmp_path):
    """The bottleneck fixture from the command line; what cannot be done
    with one is refused naming why: merging, the library's directory
    as saved (it points at the converter)."""
    args = ["run", "-m", model_path("smollm2-135m"), "--chat", "-p", QUESTIONS[1],
            "-n", "10", "--temp", "0", "-t", "2"]
    r = run_tern(*args, "--lora", str(HOULSBY / "adapter.gguf"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith('{"answer": "'), r.stdout
    r = run_tern("export-lora", "-m", model_path("smollm2-135m"), "--lora",
                 str(HOULSBY / "adapter.gguf"), "-o", str(tmp_path / "m.gguf"))
    assert r.returncode != 0 and b"cannot be folded" in r.stderr, r.stderr
    r = run_tern(*args, "--lora", str(HOULSBY))
    assert r.returncode != 0 and b"convert_bottleneck.py" in r.stderr, r.stderr


@pytest.mark.parametrize("fixture", ["smollm2-json-houlsby", "smollm2-caps-pfeiffer",
                                     "smollm2-pirate-parallel"])
def test_bottleneck_converter(fixture, tmp_path):
    """tools/convert_bottleneck.py turns the adapters library's saved
    directory into the committed GGUF (same metadata, same tensors), and
    refuses what tern's layout cannot express, by name."""
    import subprocess
    import sys
    import gguf
    src = ADAPTERS / fixture
    out = tmp_path / "a.gguf"
    conv = [sys.executable, str(FIXTURES.parent.parent / "tools" / "convert_bottleneck.py"),
            "--base", model_path("smollm2-135m")]
    r = subprocess.run(conv + ["--out", str(out), str(src)], capture_output=True)
    assert r.returncode == 0, r.stderr
    a, b = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(src / "adapter.gguf"))

    def kv(rd):
        return {k: bytes(f.parts[f.data[0]]).decode() for k, f in rd.fields.items()
                if k.startswith("adapter.")}
    assert kv(a) == kv(b) and kv(a)["adapter.type"] == "bottleneck"
    ta = {t.name: t for t in a.tensors}
    assert sorted(ta) == sorted(t.name for t in b.tensors)
    for t in b.tensors:
        assert ta[t.name].tensor_type == t.tensor_type
        assert bytes(ta[t.name].data) == bytes(t.data), t.name
    # what the layout cannot express is refused, naming the flag
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    for key, val, msg in (("ln_before", True, b"ln_before"),
                          ("use_gating", True, b"use_gating"),
                          ("original_ln_after", False, b"original_ln_after"),
                          ("non_linearity", "softplus", b"non_linearity")):
        c = dict(cfg, config=dict(cfg["config"], **{key: val}))
        (d / "adapter_config.json").write_text(json.dumps(c))
        r = subprocess.run(conv + ["--out", str(tmp_path / "x.gguf"), str(d)],
                           capture_output=True)
        assert r.returncode != 0 and msg in r.stderr, (key, r.stderr)

#!/usr/bin/env python3
"""Two models in one `tern serve --config`, both under load at once.

    python3 bench/bench_multimodel.py --tern build/tern [--tern OTHER ...]
        [--models smollm2-135m qwen2.5-coder-0.5b] [--threads 2]
        [--concurrency 4] [--requests 16] [--tokens 64]

Every model gets `--concurrency` clients sending greedy completions of
`--tokens` tokens (ignore_eos) until `--requests` per model are done. The
script prints, per binary, each model's throughput and time to first token
and the total, so two builds can be compared in one run on one machine
(before the shared compute pool each model had its own pool of all cores
and the two fought over them).
"""
import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    first = None
    n = 0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0].get("text"):
                if first is None:
                    first = time.time() - t0
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
    return first or 0.0, n, time.time()


def run_one(tern, models, threads, conc, n_req, tokens):
    port = free_port()
    with tempfile.TemporaryDirectory() as td:
        cfg = pathlib.Path(td) / "models.yaml"
        lines = ["models:"]
        for i, m in enumerate(models):
            lines += [f"  - name: m{i}", f"    path: {m}", "    ctx: 1024",
                      f"    max_seqs: {conc}"]
        cfg.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, TERN_MODELS=str(ROOT / "models"))
        # older builds have no top-level threads key: pass -t as well
        proc = subprocess.Popen([tern, "serve", "--config", str(cfg),
                                 "--port", str(port), "-t", str(threads)],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(base + "/ready", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(proc.stderr.read().decode())
                time.sleep(0.1)
        prompt = "Write a long story about a lighthouse keeper."
        jobs = []
        t0 = time.time()
        with cf.ThreadPoolExecutor(conc * len(models)) as ex:
            for i in range(len(models)):
                for _ in range(n_req):
                    jobs.append((i, ex.submit(
                        post, base + "/v1/completions",
                        {"model": f"m{i}", "prompt": prompt,
                         "max_tokens": tokens, "temperature": 0,
                         "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True}})))
            res = [(i, f.result()) for i, f in jobs]
        wall = time.time() - t0
        proc.terminate()
        proc.wait(timeout=60)
    out = {"wall_s": wall, "models": []}
    for i, m in enumerate(models):
        mine = [r for j, r in res if j == i]
        toks = sum(r[1] for r in mine)
        done = max(r[2] for r in mine) - t0  # this model's last answer
        out["models"].append({
            "model": m, "tok_s": toks / done,
            "ttft_p50": statistics.median(r[0] for r in mine),
            "ttft_max": max(r[0] for r in mine)})
    out["total_tok_s"] = sum(sum(r[1] for j, r in res if j == i)
                             for i in range(len(models))) / wall
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tern", action="append")
    ap.add_argument("--models", nargs="+",
                    default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    terns = a.tern or [str(ROOT / "build" / "tern")]
    for r in range(a.rounds):
        for t in terns:
            o = run_one(t, a.models, a.threads, a.concurrency, a.requests,
                        a.tokens)
            per = ", ".join(f"{m['model']} {m['tok_s']:.1f} tok/s (TTFT p50 "
                            f"{m['ttft_p50']:.2f} s, max {m['ttft_max']:.2f} s)"
                            for m in o["models"])
            print(f"round {r + 1} {t}: total {o['total_tok_s']:.1f} tok/s in "
                  f"{o['wall_s']:.1f} s; {per}", flush=True)


if __name__ == "__main__":
    main()

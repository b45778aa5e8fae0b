#!/usr/bin/env python3
"""tern as a gateway: what a route and a relay add, and throughput against
LiteLLM's proxy in front of the same two tern upstreams.

    python3 bench/bench_gateway.py [--tern build/tern] [--requests 200]
        [--litellm /work/venv-litellm/bin/litellm] [--concurrency 16]
        [--duration 20]

1. Route overhead: one `tern serve --config` with SmolLM2 and a rules
   route to it. Sequential streamed requests (one prompt, so the prefix
   cache serves it; max_tokens 1) alternate between the model and the
   route; TTFT p50/p99 of each and the difference.
2. Relay overhead: a gateway tern whose upstream is a second tern. The
   same streamed request (64 tokens, ignore_eos) alternately to the
   upstream directly and through the gateway: TTFT and the time per chunk
   (end-to-end minus TTFT over the chunks after the first).
3. Throughput: two tern upstreams (SmolLM2, 1 thread each) behind (a) a
   tern `balance` route, (b) LiteLLM's proxy (one worker, the two as one
   model group); --concurrency clients for --duration s each, short
   non-streamed requests (max_tokens 1): requests/s and latency p50/p99.
Every number comes from this run, on this machine; the peer runs against
the same upstreams under the same load.
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
import threading
import time

import requests

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Name a colour."}]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_ready(url, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def tern(args, cfg_text, td, name, threads):
    port = free_port()
    cfg = pathlib.Path(td) / f"{name}.yaml"
    cfg.write_text(cfg_text)
    log = open(pathlib.Path(td) / f"{name}.log", "wb")
    p = subprocess.Popen([args.tern, "serve", "--config", str(cfg), "--port",
                          str(port), "-t", str(threads)],
                         stdout=log, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/ready", p)
    return p, f"http://127.0.0.1:{port}"


def stream(session, base, model, max_tokens, ignore_eos=False):
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    if ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    first = None
    chunks = 0
    with session.post(base + "/v1/chat/completions", json=body, stream=True,
                      timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            d = json.loads(line[6:])
            ch = d.get("choices") or []
            if ch and ch[0].get("delta", {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def route_overhead(args, td):
    cfg = f"""models:
  - {{name: smollm2, path: {MODEL}}}
routes:
  - name: auto
    strategy: rules
    rules:
      - {{regex: "(?i)python", to: smollm2}}
      - {{keywords: [sql, regex], to: smollm2}}
      - {{to: smollm2}}
"""
    p, base = tern(args, cfg, td, "route", 2)
    try:
        s = requests.Session()
        for _ in range(5):
            stream(s, base, "smollm2", 1)
            stream(s, base, "auto", 1)
        direct, routed = [], []
        for _ in range(args.requests):
            direct.append(stream(s, base, "smollm2", 1)[0])
            routed.append(stream(s, base, "auto", 1)[0])
    finally:
        p.terminate()
        p.wait()
    return direct, routed


def relay_overhead(args, td):
    up, ubase = tern(args, f"models:\n  - {{name: smollm2, path: {MODEL}}}\n",
                     td, "upstream", 2)
    gw, gbase = tern(args, f"""models:
  - {{name: local, path: {MODEL}, max_seqs: 1, kv_mem: 16MiB}}
upstreams:
  - {{name: remote, base_url: "{ubase}/v1", model: smollm2}}
""", td, "gateway", 1)
    try:
        s = requests.Session()
        for _ in range(3):
            stream(s, ubase, "smollm2", 64, True)
            stream(s, gbase, "remote", 64, True)
        d_ttft, g_ttft, d_chunk, g_chunk = [], [], [], []
        n = max(10, args.requests // 10)
        for _ in range(n):
            f, e, c = stream(s, ubase, "smollm2", 64, True)
            d_ttft.append(f)
            d_chunk.append((e - f) / max(1, c - 1))
            f, e, c = stream(s, gbase, "remote", 64, True)
            g_ttft.append(f)
            g_chunk.append((e - f) / max(1, c - 1))
    finally:
        for p in (gw, up):
            p.terminate()
            p.wait()
    return d_ttft, g_ttft, d_chunk, g_chunk


def cascade_ttft(args, td):
    """A streamed cascade's TTFT: the deciding stage runs to its end before
    anything is sent. SmolLM2 -> Qwen 0.5B, accepted (-inf) and escalated
    (+inf), against each model streamed directly; 32 tokens each."""
    qwen = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    cfg = f"""models:
  - {{name: small, path: {MODEL}}}
  - {{name: large, path: {qwen}}}
routes:
  - name: accept
    strategy: cascade
    stages: [{{model: small, signal: min_prob, threshold: -.inf}}, {{model: large}}]
  - name: escalate
    strategy: cascade
    stages: [{{model: small, signal: min_prob, threshold: .inf}}, {{model: large}}]
"""
    p, base = tern(args, cfg, td, "cascade", 2)
    out = {}
    try:
        s = requests.Session()
        for m in ("small", "large", "accept", "escalate"):
            stream(s, base, m, 32, True)
        n = max(10, args.requests // 10)
        for m in ("small", "large", "accept", "escalate"):
            out[m] = [stream(s, base, m, 32, True) for _ in range(n)]
    finally:
        p.terminate()
        p.wait()
    return out


def load(base, model, conc, duration, headers=None):
    body = {"model": model, "messages": PROMPT, "max_tokens": 1,
            "temperature": 0}
    lat, errors = [], [0]
    stop = time.time() + duration
    lock = threading.Lock()

    def worker():
        s = requests.Session()
        while time.time() < stop:
            t0 = time.perf_counter()
            try:
                r = s.post(base + "/v1/chat/completions", json=body,
                           headers=headers or {}, timeout=60)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1
    t0 = time.time()
    with cf.ThreadPoolExecutor(conc) as ex:
        for f in [ex.submit(worker) for _ in range(conc)]:
            f.result()
    wall = time.time() - t0
    return len(lat) / wall, lat, errors[0]


def throughput(args, td):
    ups = [tern(args, f"models:\n  - {{name: smollm2, path: {MODEL}}}\n",
                td, f"up{i}", 1) for i in range(2)]
    procs = [p for p, _ in ups]
    out = {}
    try:
        gw, gbase = tern(args, f"""api_key: sk-bench-gateway-0001
models:
  - {{name: local, path: {MODEL}, max_seqs: 1, kv_mem: 16MiB}}
upstreams:
  - {{name: a, base_url: "{ups[0][1]}/v1", model: smollm2}}
  - {{name: b, base_url: "{ups[1][1]}/v1", model: smollm2}}
routes:
  - {{name: pool, strategy: balance, targets: [a, b]}}
""", td, "gw", 1)
        procs.append(gw)
        auth = {"Authorization": "Bearer sk-bench-gateway-0001"}
        load(gbase, "pool", args.concurrency, 3, auth)
        out["tern"] = load(gbase, "pool", args.concurrency, args.duration,
                           auth)
        gw.terminate()
        gw.wait()
        if args.litellm and os.path.exists(args.litellm):
            port = free_port()
            cfg = pathlib.Path(td) / "litellm.yaml"
            cfg.write_text(f"""model_list:
  - model_name: pool
    litellm_params: {{model: openai/smollm2, api_base: "{ups[0][1]}/v1", api_key: none}}
  - model_name: pool
    litellm_params: {{model: openai/smollm2, api_base: "{ups[1][1]}/v1", api_key: none}}
router_settings:
  routing_strategy: least-busy
litellm_settings:
  drop_params: true
general_settings:
  master_key: sk-bench-gateway-0001
""")
            log = open(pathlib.Path(td) / "litellm.log", "wb")
            env = dict(os.environ, LITELLM_LOG="ERROR")
            lp = subprocess.Popen([args.litellm, "--config", str(cfg),
                                   "--port", str(port), "--num_workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT,
                                  env=env)
            procs.append(lp)
            wait_ready(f"http://127.0.0.1:{port}/health/liveliness", lp, 300)
            lbase = f"http://127.0.0.1:{port}"
            auth = {"Authorization": "Bearer sk-bench-gateway-0001"}
            load(lbase, "pool", args.concurrency, 3, auth)
            out["litellm"] = load(lbase, "pool", args.concurrency,
                                  args.duration, auth)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--litellm", default="/work/venv-litellm/bin/litellm")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--only", choices=["route", "relay", "throughput",
                                       "cascade"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        if args.only in (None, "route"):
            d, r = route_overhead(args, td)
            print(f"route overhead, TTFT ms over {len(d)} requests each:")
            print(f"  direct  p50 {pct(d, .5)*1e3:7.2f}  p99 {pct(d, .99)*1e3:7.2f}")
            print(f"  route   p50 {pct(r, .5)*1e3:7.2f}  p99 {pct(r, .99)*1e3:7.2f}")
            print(f"  added   p50 {(pct(r, .5)-pct(d, .5))*1e3:+7.2f}  "
                  f"p99 {(pct(r, .99)-pct(d, .99))*1e3:+7.2f}")
        if args.only in (None, "relay"):
            dt, gt, dc, gc = relay_overhead(args, td)
            print(f"relay overhead, {len(dt)} streams of 64 tokens each way:")
            print(f"  TTFT ms p50   direct {pct(dt, .5)*1e3:7.2f}  via gateway "
                  f"{pct(gt, .5)*1e3:7.2f}  added {(pct(gt, .5)-pct(dt, .5))*1e3:+6.2f}")
            print(f"  per chunk ms  direct {statistics.mean(dc)*1e3:7.3f}  via "
                  f"gateway {statistics.mean(gc)*1e3:7.3f}  added "
                  f"{(statistics.mean(gc)-statistics.mean(dc))*1e3:+6.3f}")
        if args.only in (None, "cascade"):
            out = cascade_ttft(args, td)
            print("streamed cascade, TTFT and end-to-end ms (p50), 32 tokens:")
            for k, rows in out.items():
                print(f"  {k:9s} TTFT {pct([r[0] for r in rows], .5)*1e3:7.1f}"
                      f"  total {pct([r[1] for r in rows], .5)*1e3:7.1f}")
        if args.only in (None, "throughput"):
            out = throughput(args, td)
            print(f"throughput, two tern upstreams, {args.concurrency} "
                  f"clients, {args.duration:.0f} s:")
            for k, (rps, lat, err) in out.items():
                print(f"  {k:8s} {rps:7.1f} req/s  p50 {pct(lat, .5)*1e3:7.1f} ms"
                      f"  p99 {pct(lat, .99)*1e3:7.1f} ms  errors {err}")
            if "litellm" in out and out["litellm"][0] > 0:
                print(f"  ratio tern/litellm: {out['tern'][0]/out['litellm'][0]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

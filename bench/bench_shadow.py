#!/usr/bin/env python3
"""Shadow deployments: what a 100% shadow share costs the live traffic.

    python3 bench/bench_shadow.py [--tern build/tern] [--users 4]
        [--requests 24] [--think 0 0.5] [--rounds 2] [--max-tokens 64]

Two `tern serve --config` runs, identical but for one line: the live model
(Qwen2.5-Coder 0.5B) has, or has not, `shadow: {target: candidate}` with
share 1 (the candidate is SmolLM2 135M, loaded in both runs). --users
closed-loop clients each send --requests streamed chat requests (greedy,
--max-tokens, distinct prompts), pausing --think seconds between them;
TTFT and end-to-end p50/p95 and completion tokens/s of the live
requests, the runs interleaved (off, on, off, on, ...) so drift hits both.
With the shadow, it also reports the replays that ran and those dropped
(queue 64): on a saturated CPU the shadow only gets idle time, so most
replays of a busy closed loop are dropped rather than slowing it down.

The comparison is tern against itself (no peer server has shadows); the
ratio printed is shadow on / shadow off.
"""
import argparse
import concurrent.futures as cf
import json
import pathlib
import socket
import statistics
import subprocess
import tempfile
import time

import requests

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIVE = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CAND = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["rivers", "bridges", "volcanoes", "libraries", "trains", "deserts",
          "glaciers", "lighthouses", "forests", "harbours", "castles",
          "markets", "islands", "canals", "mountains", "museums"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(args, td, shadow, tag):
    cfg = pathlib.Path(td) / f"{tag}.yaml"
    sh = "    shadow: {target: candidate, share: 1}\n" if shadow else ""
    cfg.write_text(f"models:\n  - name: live\n    path: {LIVE}\n{sh}"
                   f"  - name: candidate\n    path: {CAND}\n")
    port = free_port()
    log = open(pathlib.Path(td) / f"{tag}.log", "wb")
    p = subprocess.Popen([args.tern, "serve", "--config", str(cfg), "--port",
                          str(port), "-t", str(args.threads)],
                         stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            if requests.get(base + "/ready", timeout=1).status_code == 200:
                return p, base
        except requests.RequestException:
            pass
        time.sleep(0.1)
    p.kill()
    raise RuntimeError("tern did not become ready")


def one(session, base, i, max_tokens):
    body = {"model": "live", "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content":
                          f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}"
                          f" (note {i})."}]}
    t0 = time.perf_counter()
    ttft, n = None, 0
    with session.post(base + "/v1/chat/completions", json=body, stream=True,
                      timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices", []):
                if (ch.get("delta") or {}).get("content"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    n += 1
    return ttft, time.perf_counter() - t0


def load(args, base, think, seed, per_user=None):
    def user(u):
        s = requests.Session()
        out = []
        for k in range(per_user or args.requests):
            out.append(one(s, base, seed * 1000 + u * 100 + k, args.max_tokens))
            if think:
                time.sleep(think)
        return out
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.users) as pool:
        res = [x for xs in pool.map(user, range(args.users)) for x in xs]
    wall = time.perf_counter() - t0
    return res, wall


def metric(base, name, **labels):
    total = 0.0
    for line in requests.get(base + "/metrics", timeout=30).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--think", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for think in args.think:
            acc = {False: [], True: []}
            walls = {False: 0.0, True: 0.0}
            replays = {"ok": 0.0, "dropped": 0.0}
            for rnd in range(args.rounds):
                for shadow in (False, True):
                    p, base = start(args, td, shadow, f"s{int(shadow)}")
                    try:
                        load(args, base, 0, 99, per_user=1)  # warm-up
                        res, wall = load(args, base, think, rnd)
                        acc[shadow] += res
                        walls[shadow] += wall
                        if shadow:
                            for oc in replays:
                                replays[oc] += metric(
                                    base, "tern_shadow_replays_total",
                                    outcome=oc)
                    finally:
                        p.terminate()
                        p.wait(60)
            n = args.users * args.requests * args.rounds
            for shadow in (False, True):
                r = acc[shadow]
                ttft = [x[0] * 1000 for x in r if x[0] is not None]
                e2e = [x[1] * 1000 for x in r]
                rows.append({
                    "think_s": think, "shadow": shadow,
                    "ttft_p50": q(ttft, 0.5), "ttft_p95": q(ttft, 0.95),
                    "e2e_p50": q(e2e, 0.5), "e2e_p95": q(e2e, 0.95),
                    "tok_s": n * args.max_tokens / walls[shadow],
                    "replays_ok": replays["ok"] if shadow else None,
                    "replays_dropped": replays["dropped"] if shadow else None,
                })
    print(f"\n{args.users} users x {args.requests} requests x {args.rounds} "
          f"rounds, {args.max_tokens} tokens, {args.threads} threads; live "
          f"{LIVE.name}, shadow {CAND.name} (share 1)\n")
    print("| think s | shadow | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | "
          "e2e p95 ms | tok/s | replays run / dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rep = (f"{r['replays_ok']:.0f} / {r['replays_dropped']:.0f}"
               if r["shadow"] else "")
        print(f"| {r['think_s']:g} | {'on' if r['shadow'] else 'off'} | "
              f"{r['ttft_p50']:.1f} | {r['ttft_p95']:.1f} | "
              f"{r['e2e_p50']:.0f} | {r['e2e_p95']:.0f} | {r['tok_s']:.1f} | "
              f"{rep} |")
    for i in range(0, len(rows), 2):
        off, on = rows[i], rows[i + 1]
        print(f"think {off['think_s']:g} s: on/off e2e p50 "
              f"{on['e2e_p50'] / off['e2e_p50']:.3f}, e2e p95 "
              f"{on['e2e_p95'] / off['e2e_p95']:.3f}, TTFT p50 "
              f"{on['ttft_p50'] / off['ttft_p50']:.3f}, tok/s "
              f"{on['tok_s'] / off['tok_s']:.3f}")


if __name__ == "__main__":
    main()

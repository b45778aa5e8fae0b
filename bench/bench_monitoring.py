#!/usr/bin/env python3
"""Monitoring overhead and dashboard API speed (issue 13).

1. Request log and tracing overhead: the same `tern serve` (same model,
   threads, prompts) driven by C closed-loop streaming users, without the
   log, with `--log-db --log-content` (every row written with its text),
   and with that plus `--otlp-endpoint` (every request traced, to an OTLP
   sink in this process that reads and drops what it gets), rotating the
   arms' order each round so drift hits all alike. Reports output tokens/s
   and TTFT p99 of each and the ratios (goal: under 2% lost). The
   dashboard's in-memory statistics are always on, so every arm has them.

2. Dashboard API with a big log: a database of --rows rows (made with
   Python's sqlite3 in tern's schema, timestamps over the last 24 hours,
   five models, 5% errors) opened by `tern serve --log-db`, then each
   default view requested --calls times: /api/requests (the table's first
   page), the same filtered by model, by status=error, the next page via
   the cursor, one request's detail, and /api/stats over 15 minutes and 24
   hours. Reports p50/p99 per view (goal: p99 under 100 ms).

  python3 bench/bench_monitoring.py --model smollm2-135m --threads 2 \
      --concurrency 16 --requests 64 --rounds 3 --rows 1000000
  ... --results-md      # append a section to bench/RESULTS.md
"""
import argparse
import datetime
import http.client
import http.server
import json
import os
import pathlib
import random
import sqlite3
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402

ROOT = bs.ROOT


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def start_tern(args, model_path, extra, logdir, name):
    port = bs.free_port()
    argv = [args.tern, "serve", "-m", model_path, "-t", str(args.threads),
            "--port", str(port), "--max-seqs", str(args.concurrency),
            "--queue", "1024", *extra]
    srv = bs.Server("tern", argv, dict(os.environ), port, logdir)
    srv.name_shown = name
    srv.start(120)
    return srv


class OtlpSink:
    """Accepts OTLP/HTTP posts and drops them (counts spans' batches)."""

    def __init__(self):
        outer = self
        self.posts = 0

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = (f"http://127.0.0.1:{self.httpd.server_address[1]}"
                    "/v1/traces")
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


ARMS = ["no log", "log + content", "log + content + traces"]


def overhead(args, model_path, tmp):
    counter = bs.TokenCounter(args.tern, model_path)
    body = bs.fit_text(counter, 7, args.prompt_tokens)
    sink = OtlpSink()
    arms = {a: [] for a in ARMS}
    for rnd in range(args.rounds):
        k = rnd % len(ARMS)
        order = ARMS[k:] + ARMS[:k]
        for arm in order:
            extra = []
            if arm != "no log":
                db = os.path.join(tmp, f"ovh-{rnd}-{len(arm)}.db")
                extra = ["--log-db", db, "--log-content"]
            if arm.endswith("traces"):
                extra += ["--otlp-endpoint", sink.url]
            srv = start_tern(args, model_path, extra, tmp, arm)
            try:
                base = rnd * 100000 + ARMS.index(arm) * 10000
                prompts = [bs.request_prompt(body, base + i)
                           for i in range(args.requests)]
                # warm-up (page faults, first allocations)
                bs.run_closed(srv, prompts[:args.concurrency],
                              args.concurrency, 4, 300)
                res, wall = bs.run_closed(srv, prompts, args.concurrency,
                                          args.output_tokens, 600)
                s = bs.summarize(res, wall)
                if s["failed"]:
                    raise bs.BenchError(f"{arm}: {s['failed']} failed: "
                                        f"{s['first_error']}")
                arms[arm].append(s)
                log(f"round {rnd} {arm}: {s['output_tok_s']:.1f} tok/s, "
                    f"TTFT p99 {s['ttft_p99_s'] * 1000:.0f} ms")
            finally:
                srv.stop()
    log(f"OTLP sink got {sink.posts} posts")
    out = {}
    for arm, runs in arms.items():
        out[arm] = {
            "output_tok_s": sum(r["output_tok_s"] for r in runs) / len(runs),
            "ttft_p99_ms": 1000 * sum(r["ttft_p99_s"] for r in runs) / len(runs),
            "itl_p99_ms": 1000 * sum(r["itl_p99_s"] for r in runs) / len(runs),
            "rounds": [round(r["output_tok_s"], 1) for r in runs],
        }
    return out


SCHEMA = """CREATE TABLE requests (ts INTEGER NOT NULL, request_id TEXT,
 tenant TEXT, endpoint TEXT, model TEXT, status INTEGER, finish_reason TEXT,
 error TEXT, prompt_tokens INTEGER, cached_tokens INTEGER,
 completion_tokens INTEGER, queue_ms REAL, ttft_ms REAL, itl_mean_ms REAL,
 itl_max_ms REAL, e2e_ms REAL, cost REAL, prompt TEXT, output TEXT);
CREATE INDEX requests_ts ON requests(ts);
CREATE INDEX requests_model_ts ON requests(model, ts);
CREATE INDEX requests_id ON requests(request_id);"""


def make_db(path, rows):
    con = sqlite3.connect(path)
    con.executescript("PRAGMA journal_mode=WAL;" + SCHEMA)
    rng = random.Random(3)
    now = int(time.time() * 1000)
    models = [f"model-{i}" for i in range(5)]
    batch = []
    t0 = time.time()
    for i in range(rows):
        err = rng.random() < 0.05
        batch.append((now - 86_400_000 + i * 86_400_000 // rows,
                      f"chatcmpl-{i:024x}", None, "/v1/chat/completions",
                      rng.choice(models), 400 if err else 200,
                      None if err else "stop", "bad" if err else None,
                      rng.randint(10, 2000), 0, rng.randint(1, 500),
                      1.0, 50.0, 10.0, 30.0, 900.0, 0.0001, None, None))
        if len(batch) == 50000:
            con.executemany("INSERT INTO requests VALUES "
                            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
            batch = []
    if batch:
        con.executemany("INSERT INTO requests VALUES "
                        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
    con.commit()
    con.close()
    log(f"{rows} rows written in {time.time() - t0:.1f} s")


def timed_get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    dt = time.perf_counter() - t
    c.close()
    if r.status != 200:
        raise bs.BenchError(f"{path}: {r.status} {body[:200]!r}")
    return dt, body


def api_speed(args, model_path, tmp):
    db = os.path.join(tmp, "big.db")
    make_db(db, args.rows)
    srv = start_tern(args, model_path, ["--log-db", db], tmp, "big log")
    try:
        _, first = timed_get(srv.port, "/api/requests")
        page = json.loads(first)
        rid = page["data"][10]["request_id"]
        views = {
            "requests (first page)": "/api/requests",
            "requests, model filter": "/api/requests?model=model-3",
            "requests, status=error": "/api/requests?status=error",
            "requests, next page": "/api/requests?before=" + page["next"],
            "requests, since 1h": "/api/requests?since=1h",
            "one request": "/api/requests/" + rid,
            "stats 15m": "/api/stats?window=15m",
            "stats 24h": "/api/stats?window=24h",
        }
        out = {}
        for name, path in views.items():
            ts = [timed_get(srv.port, path)[0] for _ in range(args.calls)]
            out[name] = {"p50_ms": 1000 * bs.percentile(ts, 50),
                         "p99_ms": 1000 * bs.percentile(ts, 99)}
            log(f"{name}: p50 {out[name]['p50_ms']:.2f} ms, "
                f"p99 {out[name]['p99_ms']:.2f} ms")
    finally:
        srv.stop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--results-md", action="store_true")
    args = ap.parse_args()
    model_path = str(ROOT / "models" / bs.FILES[args.model])
    with tempfile.TemporaryDirectory() as tmp:
        ovh = None if args.skip_overhead else overhead(args, model_path, tmp)
        api = api_speed(args, model_path, tmp)
    lines = []
    if ovh:
        a = ovh["no log"]
        lines += [
            f"Request log and tracing overhead: {args.model}, {args.threads} "
            f"threads, {args.concurrency} streaming users, {args.requests} "
            f"requests of {args.prompt_tokens} prompt / {args.output_tokens} "
            f"output tokens, {args.rounds} rounds in rotating order (means; "
            f"each round's tok/s in brackets).",
            "",
            "| tern | output tok/s | TTFT p99 ms | ITL p99 ms | tok/s vs no log |",
            "| --- | --- | --- | --- | --- |"]
        for arm in ARMS:
            b = ovh[arm]
            lines.append(
                f"| {arm} | {b['output_tok_s']:.1f} {b['rounds']} | "
                f"{b['ttft_p99_ms']:.0f} | {b['itl_p99_ms']:.1f} | "
                f"{b['output_tok_s'] / a['output_tok_s']:.3f} |")
        lines.append("")
    lines += [f"Dashboard API over a request log of {args.rows:,} rows "
              f"({args.calls} calls per view, one client):", "",
              "| view | p50 ms | p99 ms |", "| --- | --- | --- |"]
    for k, v in api.items():
        lines.append(f"| {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.results_md:
        day = datetime.date.today().isoformat()
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## Monitoring: request log overhead, dashboard API "
                    f"({day})\n\n`python3 bench/bench_monitoring.py "
                    f"{' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    try:
        main()
    except bs.BenchError as e:
        log(f"error: {e}")
        sys.exit(1)

#!/usr/bin/env python3
"""Serving benchmark: `tern serve` vs llama.cpp's llama-server, side by side.

The script starts each server itself (tern first, then llama-server) on a
free loopback port with the same model file, threads and per-sequence
context, waits until it is ready (tern: GET /ready; llama-server: GET
/health), and drives it over the OpenAI-compatible
API with streaming POST /v1/completions requests:

  * fixed concurrency (closed loop: C workers, each sends its next request
    as soon as the previous one finishes), or
  * Poisson arrivals (open loop: --arrival poisson --rate R ...).

Every request has a fixed prompt of about --prompt-tokens tokens that starts
with a distinct request number (so neither server's prefix cache can reuse
another request's prompt) and asks for exactly --output-tokens tokens
(ignore_eos, temperature 0). Per level it reports output tokens/s (all
output tokens / wall time of the level), requests/s, TTFT p50/p99 (time to
the first chunk carrying text), inter-token latency p50/p99 (gaps between
chunks carrying text) and TPOT (per request (e2e - ttft) / (tokens - 1)),
plus tern/llama-server ratios.

--multi-turn measures prefix reuse: a chat with a ~--history-tokens shared
history (system prompt + earlier turns, with a unique nonce at the very
start so nothing is cached) -> TTFT of turn 1 (cold), then turn 2 (same
history + turn 1's answer + a new user message) on the same server. The
goal in issue 3 is turn2/turn1 <= 0.25.

Examples (2 cores: keep --requests small):

  python3 bench/bench_serve.py --model smollm2-135m --threads 2 \
      --concurrency 1 4 16 --requests 32 --prompt-tokens 128 --output-tokens 128
  python3 bench/bench_serve.py --peer-only --concurrency 4 --requests 8
  python3 bench/bench_serve.py --arrival poisson --rate 0.5 1 --requests 16
  python3 bench/bench_serve.py --multi-turn --history-tokens 1500
  python3 bench/bench_serve.py ... --json          # one JSON object on stdout
  python3 bench/bench_serve.py ... --results-md    # append to bench/RESULTS.md

Python standard library only (http.client + threading).
"""
import argparse
import ctypes
import datetime
import http.client
import json
import os
import pathlib
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

FILES = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-Q4_K_M.gguf",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}

TERN = "tern"
PEER = "llama-server"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------- statistics

def percentile(xs, p):
    """Linear-interpolated percentile (like numpy's default); None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------- prompts

WORDS = (
    "the river carried small boats past old stone houses while children "
    "watched from the bridge and a baker opened his shop early every "
    "morning to sell fresh bread warm rolls and sweet cakes to workers who "
    "walked along the narrow streets toward the harbor where ships arrived "
    "from distant islands with fruit spices cloth and letters from families "
    "living far away in the mountains near the northern forest there was a "
    "quiet village with a school a library a market and a garden full of "
    "flowers trees birds and bees people liked to read stories about "
    "travel history science music and the weather changed slowly through "
    "the seasons from cold winter to bright summer"
).split()


def make_text(rng, n_words):
    out = []
    sentence = 0
    for i in range(n_words):
        w = rng.choice(WORDS)
        if sentence == 0:
            w = w.capitalize()
        sentence += 1
        if sentence >= rng.randint(8, 16) or i == n_words - 1:
            w += "."
            sentence = 0
        out.append(w)
    return " ".join(out)


class TokenCounter:
    """Counts tokens with `tern tokenize` when available (no server needed),
    else estimates (these common words are about one token each)."""

    def __init__(self, tern, model_path):
        self.tern = tern
        self.model = model_path
        self.exact = os.access(tern, os.X_OK)

    def count(self, text):
        if self.exact:
            try:
                r = subprocess.run([self.tern, "tokenize", "-m", self.model],
                                   input=text, capture_output=True, text=True,
                                   timeout=60)
                if r.returncode == 0:
                    return len(json.loads(r.stdout))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self.exact = False
        return int(len(text.split()) * 1.12) + 1


def fit_text(counter, seed, target_tokens):
    """Deterministic text of about target_tokens tokens."""
    if target_tokens <= 0:
        return ""
    n_words = max(1, target_tokens)
    for _ in range(4):
        text = make_text(random.Random(seed), n_words)
        got = counter.count(text)
        if abs(got - target_tokens) <= max(1, target_tokens // 100):
            break
        n_words = max(1, round(n_words * target_tokens / max(got, 1)))
    return make_text(random.Random(seed), n_words)


def request_prompt(body, i):
    # The distinct number comes first so no two prompts share a first block.
    return f"Request {i:06d}. {body}"


# --------------------------------------------------------------- processes

def _set_pdeathsig():
    # Kill the server if this script dies without cleaning up (SIGKILL).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class Server:
    def __init__(self, name, argv, env, port, logdir):
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.log_path = os.path.join(logdir, name + ".log")
        self.proc = None
        self.model_id = None

    def start(self, timeout):
        log(f"[{self.name}] starting: {shlex.join(self.argv)}")
        self.logf = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL,
                stdout=self.logf, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig)
        except OSError as e:
            raise BenchError(f"{self.name}: cannot start {self.argv[0]}: {e}")
        t0 = time.monotonic()
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise BenchError(f"{self.name} exited with status {rc} "
                                 f"before it was healthy; last lines of its "
                                 f"output:\n{self.tail()}")
            try:
                # tern: /health is liveness, /ready says the models are
                # loaded; llama-server's /health is 503 until it is loaded.
                path = "/ready" if self.name == "tern" else "/health"
                status, _ = http_get(self.port, path, timeout=2.0)
                if status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"{self.name} not healthy after {timeout:.0f}"
                                 f" s; last lines of its output:\n"
                                 f"{self.tail()}")
            time.sleep(0.2)
        log(f"[{self.name}] healthy on port {self.port} after "
            f"{time.monotonic() - t0:.1f} s")
        try:
            status, body = http_get(self.port, "/v1/models")
            if status == 200:
                self.model_id = json.loads(body)["data"][0]["id"]
        except (OSError, http.client.HTTPException, ValueError, KeyError,
                IndexError, TypeError):
            pass

    def tail(self, n=25):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join("    " + x for x in lines[-n:])
        except OSError:
            return "    (no output)"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.proc = None
        self.logf.close()


# ---------------------------------------------------------------- requests

class Result:
    __slots__ = ("ok", "error", "start", "ttft", "e2e", "chunk_times",
                 "text", "usage_out", "usage_in", "n_chunks")

    def __init__(self):
        self.ok = False
        self.error = None
        self.start = 0.0
        self.ttft = None
        self.e2e = None
        self.chunk_times = []
        self.text = []
        self.usage_out = None
        self.usage_in = None
        self.n_chunks = 0

    @property
    def out_tokens(self):
        return self.usage_out if self.usage_out is not None else self.n_chunks

    def itls(self):
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


def stream_request(port, path, payload, timeout):
    """One streaming request; returns a Result (never raises)."""
    res = Result()
    body = json.dumps(payload).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    res.start = time.perf_counter()
    try:
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json",
                              "Accept": "text/event-stream"})
        r = conn.getresponse()
        if r.status != 200:
            raise BenchError(f"HTTP {r.status}: "
                             f"{r.read(500).decode('utf-8', 'replace')}")
        done = False
        while True:
            line = r.readline()
            if not line:
                break
            now = time.perf_counter()
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                raise BenchError(f"error event: {obj['error']}")
            text = ""
            for ch in obj.get("choices") or ():
                if "text" in ch:
                    text += ch.get("text") or ""
                else:
                    text += (ch.get("delta") or {}).get("content") or ""
            if text:
                if res.ttft is None:
                    res.ttft = now - res.start
                res.chunk_times.append(now)
                res.text.append(text)
                res.n_chunks += 1
            usage = obj.get("usage")
            if usage:
                res.usage_out = usage.get("completion_tokens")
                res.usage_in = usage.get("prompt_tokens")
        res.e2e = time.perf_counter() - res.start
        if not done:
            raise BenchError("stream ended without data: [DONE]")
        if res.ttft is None:
            raise BenchError("no text in the stream")
        res.ok = True
    except (OSError, http.client.HTTPException, ValueError,
            BenchError) as e:
        res.error = f"{type(e).__name__}: {e}"
        if res.e2e is None:
            res.e2e = time.perf_counter() - res.start
    finally:
        conn.close()
    return res


def completion_payload(model_id, prompt, max_tokens):
    p = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
         "stream": True, "stream_options": {"include_usage": True},
         "ignore_eos": True, "cache_prompt": True}
    if model_id:
        p["model"] = model_id
    return p


# ------------------------------------------------------------------- levels

def run_closed(server, prompts, concurrency, max_tokens, timeout,
               payload=None):
    """payload(i, body): a hook that may change request i's body."""
    results = [None] * len(prompts)
    nxt = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = nxt[0]
                if i >= len(prompts):
                    return
                nxt[0] += 1
            body = completion_payload(server.model_id, prompts[i], max_tokens)
            if payload:
                payload(i, body)
            results[i] = stream_request(server.port, "/v1/completions", body,
                                        timeout)

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def run_poisson(server, prompts, rate, max_tokens, timeout, seed):
    rng = random.Random(seed)
    results = [None] * len(prompts)

    def one(i):
        results[i] = stream_request(
            server.port, "/v1/completions",
            completion_payload(server.model_id, prompts[i], max_tokens),
            timeout)

    threads = []
    t0 = time.perf_counter()
    due = t0
    for i in range(len(prompts)):
        if i:
            due += rng.expovariate(rate)
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize(results, wall):
    ok = [r for r in results if r is not None and r.ok]
    bad = [r for r in results if r is None or not r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [g for r in ok for g in r.itls()]
    tpots = [(r.e2e - r.ttft) / (r.out_tokens - 1)
             for r in ok if r.out_tokens > 1]
    out_tok = sum(r.out_tokens for r in ok)
    chunks = sum(r.n_chunks for r in ok)
    s = {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(bad),
        "first_error": next((r.error for r in bad if r is not None),
                            None if not bad else "no result"),
        "wall_s": wall,
        "output_tokens": out_tok,
        "prompt_tokens": sum(r.usage_in or 0 for r in ok) or None,
        "tokens_per_chunk": out_tok / chunks if chunks else None,
        "output_tok_s": out_tok / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "tpot_mean_s": mean(tpots),
        "e2e_p50_s": percentile([r.e2e for r in ok], 50),
    }
    return s


def _cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]          # total, idle + iowait


def other_busy_cores(interval=0.5):
    """Cores busy during `interval` while our server idles (between levels),
    i.e. other work on the machine; None where /proc/stat is unreadable."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(interval)
        t1, i1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


def run_load(server, args, prompts_for, levels):
    out = []
    for lv in levels:
        n = args.requests or (max(4, 2 * lv) if args.arrival == "closed"
                              else 16)
        prompts = prompts_for(n)
        busy = other_busy_cores()
        if busy is not None and busy > 0.3:
            log(f"[{server.name}] warning: {busy:.1f} cores busy with other "
                f"work while the server idles; the numbers will be skewed")
        cpu0 = time.process_time()
        if args.arrival == "closed":
            label = f"concurrency {lv}"
            log(f"[{server.name}] {label}: {n} requests ...")
            results, wall = run_closed(server, prompts, lv,
                                       args.output_tokens, args.timeout)
        else:
            label = f"rate {lv}/s"
            log(f"[{server.name}] {label}: {n} requests ...")
            results, wall = run_poisson(server, prompts, lv,
                                        args.output_tokens, args.timeout,
                                        args.seed)
        s = summarize(results, wall)
        # CPU this client used (all threads), to show it leaves the cores
        # to the server.
        s["client_cpu_s"] = time.process_time() - cpu0
        s["level"] = lv
        s["other_busy_cores"] = busy
        s["arrival"] = args.arrival
        log(f"[{server.name}] {label}: {fmt(s['output_tok_s'], 1)} tok/s, "
            f"TTFT p50 {fmt_ms(s['ttft_p50_s'])} p99 "
            f"{fmt_ms(s['ttft_p99_s'])} ms, ITL p50 "
            f"{fmt_ms(s['itl_p50_s'])} ms, {s['failed']} failed, client CPU "
            f"{s['client_cpu_s']:.2f} s in {s['wall_s']:.1f} s")
        if (s["tokens_per_chunk"] or 1) > 1.05:
            log(f"[{server.name}]   note: {s['tokens_per_chunk']:.2f} tokens "
                f"per text chunk; ITL is per chunk, TPOT per token")
        if s["failed"]:
            log(f"[{server.name}]   first error: {s['first_error']}")
            if not server.alive():
                raise BenchError(f"{server.name} died during the run; last "
                                 f"lines of its output:\n{server.tail()}")
        out.append(s)
    return out


# --------------------------------------------------------------- multi-turn

def build_history(counter, seed, history_tokens):
    """System prompt + earlier turns totalling about history_tokens."""
    n_turns = 3
    # Leave room for the chat template, the "Question k" lines and the new
    # user message, so turn 1's prompt is about history_tokens in all.
    history_tokens = max(64, history_tokens - 100)
    sys_tok = history_tokens // 5
    per = (history_tokens - sys_tok) // (2 * n_turns)
    system = ("You are a helpful assistant for a small town newspaper. "
              + fit_text(counter, seed, sys_tok))
    msgs = [{"role": "system", "content": system}]
    for k in range(n_turns):
        msgs.append({"role": "user", "content":
                     f"Question {k + 1}: please summarise this. " +
                     fit_text(counter, seed + 10 + k, per)})
        msgs.append({"role": "assistant", "content":
                     fit_text(counter, seed + 20 + k, per)})
    return msgs


def render_plain(msgs):
    # Plain text rendering for --mt-endpoint completions.
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n"
                   for m in msgs) + "Assistant:"


def mt_request(server, args, msgs):
    if args.mt_endpoint == "chat":
        payload = {"messages": msgs, "max_tokens": args.mt_output_tokens,
                   "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True},
                   "ignore_eos": True, "cache_prompt": True}
        if server.model_id:
            payload["model"] = server.model_id
        path = "/v1/chat/completions"
    else:
        payload = completion_payload(server.model_id, render_plain(msgs),
                                     args.mt_output_tokens)
        path = "/v1/completions"
    return stream_request(server.port, path, payload, args.timeout)


def run_multi_turn(server, args, history):
    trials = []
    for k in range(args.mt_trials):
        nonce = f"Session {random.Random(args.seed * 1000 + k).getrandbits(48):012x}. "
        msgs = [dict(m) for m in history]
        msgs[0]["content"] = nonce + msgs[0]["content"]
        msgs.append({"role": "user", "content":
                     "Now tell me what happened in the village."})
        r1 = mt_request(server, args, msgs)
        if not r1.ok:
            raise BenchError(f"{server.name} multi-turn turn 1: {r1.error}")
        msgs.append({"role": "assistant", "content": "".join(r1.text)})
        msgs.append({"role": "user", "content":
                     "Thank you. And what did the baker sell?"})
        r2 = mt_request(server, args, msgs)
        if not r2.ok:
            raise BenchError(f"{server.name} multi-turn turn 2: {r2.error}")
        t = {"turn1_ttft_s": r1.ttft, "turn2_ttft_s": r2.ttft,
             "turn1_prompt_tokens": r1.usage_in,
             "turn2_prompt_tokens": r2.usage_in,
             "ratio": r2.ttft / r1.ttft}
        log(f"[{server.name}] multi-turn trial {k + 1}: turn 1 "
            f"{fmt_ms(r1.ttft)} ms ({r1.usage_in} prompt tokens), turn 2 "
            f"{fmt_ms(r2.ttft)} ms ({r2.usage_in}), ratio {t['ratio']:.3f}")
        trials.append(t)
    med = lambda key: percentile([t[key] for t in trials], 50)
    return {"trials": trials, "turn1_ttft_s": med("turn1_ttft_s"),
            "turn2_ttft_s": med("turn2_ttft_s"), "ratio": med("ratio"),
            "turn1_prompt_tokens": trials[0]["turn1_prompt_tokens"],
            "turn2_prompt_tokens": trials[0]["turn2_prompt_tokens"],
            "goal_met": med("ratio") <= 0.25}


# ------------------------------------------------------------------ output

def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def fmt_ms(x):
    return "-" if x is None else f"{1000 * x:.0f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def table(report):
    lines = []
    servers = report["servers"]
    unit = "C" if report["config"]["arrival"] == "closed" else "rate/s"
    have_load = any(s.get("levels") for s in servers.values())
    if have_load:
        lines += [
            f"| server | {unit} | reqs | failed | out tok/s | req/s | "
            "TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
            "TPOT ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            " ---: | ---: |"]
        for name, s in servers.items():
            for lv in s.get("levels", []):
                lines.append(
                    f"| {name} | {lv['level']} | {lv['requests']} | "
                    f"{lv['failed']} | {fmt(lv['output_tok_s'], 1)} | "
                    f"{fmt(lv['req_s'], 3)} | {fmt_ms(lv['ttft_p50_s'])} | "
                    f"{fmt_ms(lv['ttft_p99_s'])} | {fmt_ms(lv['itl_p50_s'])} "
                    f"| {fmt_ms(lv['itl_p99_s'])} | "
                    f"{fmt_ms(lv['tpot_mean_s'])} |")
        if report.get("ratios"):
            lines += ["", f"| {unit} | throughput tern/llama-server | "
                      "TTFT p99 tern/llama-server |", "| ---: | ---: | ---: |"]
            for r in report["ratios"]:
                lines.append(f"| {r['level']} | "
                             f"**{fmt(r['throughput_ratio'])}x** | "
                             f"**{fmt(r['ttft_p99_ratio'])}x** |")
    mts = {n: s["multi_turn"] for n, s in servers.items()
           if s.get("multi_turn")}
    if mts:
        if lines:
            lines.append("")
        lines += ["| server | history prompt tokens | turn 1 TTFT ms | "
                  "turn 2 TTFT ms | turn2/turn1 | goal <= 0.25 |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for n, m in mts.items():
            lines.append(f"| {n} | {m['turn1_prompt_tokens'] or '-'} | "
                         f"{fmt_ms(m['turn1_ttft_s'])} | "
                         f"{fmt_ms(m['turn2_ttft_s'])} | "
                         f"{fmt(m['ratio'], 3)} | "
                         f"{'yes' if m['goal_met'] else 'no'} |")
    return "\n".join(lines)


def machine():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def append_results_md(report, text):
    c = report["config"]
    work = []
    if c["levels"]:
        work.append(f"prompt {c['prompt_tokens']} / output "
                    f"{c['output_tokens']} tokens, {c['arrival']} arrival")
    if c["multi_turn"]:
        work.append(f"multi-turn, ~{c['history_tokens']}-token history")
    lines = [
        f"### Serving: {c['model']}, threads {c['threads']}, "
        f"{'; '.join(work)}, {report['date']}, commit {report['commit']}",
        "",
        f"Machine: {report['machine']}, {report['cpus']} cores. tern: "
        f"--max-seqs {c['tern_max_seqs']}, --ctx {c['ctx']}; llama-server "
        f"(llama.cpp from the llama-cpp-python source package): -np "
        f"{c['peer_slots']}, -c {c['peer_slots'] * c['ctx']} "
        f"({c['ctx']} per slot), default prompt cache. Streaming, "
        f"temperature 0, ignore_eos; every prompt starts with a distinct "
        f"request number or nonce, so no request reuses another's prefix.",
        f"Command: `{report['command']}`",
        "",
        text,
    ]
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


# --------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="short name (" + ", ".join(FILES) + ") or GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048,
                    help="context per sequence/slot (llama-server gets "
                    "-c peer_slots*ctx)")
    ap.add_argument("--peer-slots", type=int, default=8,
                    help="llama-server -np (parallel slots)")
    ap.add_argument("--tern-max-seqs", type=int, default=16,
                    help="tern serve --max-seqs")
    ap.add_argument("--tern-kv-mem", default=None,
                    help="tern serve --kv-mem (default: tern's own)")
    ap.add_argument("--tern-extra", default="",
                    help="more tern serve flags, one shell-quoted string")
    ap.add_argument("--peer-extra", default="",
                    help="more llama-server flags, e.g. '--no-cache-prompt'")
    ap.add_argument("--arrival", choices=["closed", "poisson"],
                    default="closed")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="closed-loop levels (default 1 4 16)")
    ap.add_argument("--rate", type=float, nargs="+", default=None,
                    help="Poisson arrival rates in requests/s")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default: max(4, 2*C) closed, "
                    "16 poisson)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--multi-turn", action="store_true",
                    help="measure turn-2 vs turn-1 TTFT (alone unless "
                    "--concurrency/--rate is also given)")
    ap.add_argument("--history-tokens", type=int, default=1500)
    ap.add_argument("--mt-output-tokens", type=int, default=32)
    ap.add_argument("--mt-trials", type=int, default=3)
    ap.add_argument("--mt-endpoint", choices=["chat", "completions"],
                    default="chat")
    ap.add_argument("--no-warmup", action="store_true")
    grp = ap.add_mutually_exclusive_group()
    grp.add_argument("--tern-only", action="store_true")
    grp.add_argument("--peer-only", action="store_true")
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--llama-server",
                    default=str(ROOT / "ref" / "bin" / "llama-server"))
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="socket timeout per request, seconds")
    ap.add_argument("--start-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout instead of tables")
    ap.add_argument("--results-md", action="store_true",
                    help="append a section to bench/RESULTS.md")
    ap.add_argument("--keep-logs", action="store_true")
    a = ap.parse_args()

    if a.arrival == "poisson":
        if not a.rate:
            ap.error("--arrival poisson needs --rate R [R ...]")
        levels = a.rate
    else:
        if a.rate:
            ap.error("--rate needs --arrival poisson")
        levels = a.concurrency or ([] if a.multi_turn else [1, 4, 16])
    if any(x <= 0 for x in levels):
        ap.error("levels must be positive")
    need = a.prompt_tokens + a.output_tokens + 16
    if levels and need > a.ctx:
        ap.error(f"--ctx {a.ctx} is too small for prompt + output ({need})")
    if a.multi_turn and a.history_tokens + 3 * a.mt_output_tokens + 128 > a.ctx:
        ap.error(f"--ctx {a.ctx} is too small for --history-tokens")

    model = a.model if os.path.sep in a.model else str(
        ROOT / "models" / FILES.get(a.model, a.model))
    if not os.path.isfile(model):
        sys.exit(f"bench_serve: no model file {model}")

    which = [TERN, PEER]
    if a.tern_only:
        which = [TERN]
    if a.peer_only:
        which = [PEER]
    if TERN in which and not os.access(a.tern, os.X_OK):
        sys.exit(f"bench_serve: {a.tern} not built (or use --peer-only)")
    if PEER in which and not os.access(a.llama_server, os.X_OK):
        sys.exit(f"bench_serve: {a.llama_server} missing "
                 f"(bash tools/build_llamacpp.sh, or use --tern-only)")

    counter = TokenCounter(a.tern, model)
    body = ""
    if levels:
        head = counter.count(request_prompt("", 0))
        body = fit_text(counter, a.seed, max(1, a.prompt_tokens - head))
        extra = counter.count(request_prompt(body, 0)) - a.prompt_tokens
        if extra:
            body = fit_text(counter, a.seed,
                            max(1, a.prompt_tokens - head - extra))
    if levels:
        log(f"prompt body: {counter.count(request_prompt(body, 0))} tokens "
            f"({'exact' if counter.exact else 'estimated'})")
    history = build_history(counter, a.seed + 100, a.history_tokens) \
        if a.multi_turn else None
    next_id = [0]

    def prompts_for(n):
        ps = [request_prompt(body, next_id[0] + i) for i in range(n)]
        next_id[0] += n
        return ps

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                            cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine(),
        "cpus": os.cpu_count(),
        "command": "python3 bench/bench_serve.py " + shlex.join(sys.argv[1:]),
        "config": {
            "model": a.model, "model_file": model, "threads": a.threads,
            "ctx": a.ctx, "peer_slots": a.peer_slots,
            "tern_max_seqs": a.tern_max_seqs, "arrival": a.arrival,
            "levels": levels, "requests": a.requests,
            "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens,
            "multi_turn": a.multi_turn,
            "history_tokens": a.history_tokens if a.multi_turn else None,
        },
        "servers": {},
    }
    log(f"slots: tern --max-seqs {a.tern_max_seqs}; llama-server -np "
        f"{a.peer_slots} -c {a.peer_slots * a.ctx} ({a.ctx} per slot)")

    logdir = tempfile.mkdtemp(prefix="bench_serve.")
    current = [None]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    rc = 0
    try:
        for name in which:
            next_id[0] = 0              # the same prompts for every server
            port = free_port()
            if name == TERN:
                argv = [a.tern, "serve", "-m", model, "--threads",
                        str(a.threads), "--ctx", str(a.ctx), "--max-seqs",
                        str(a.tern_max_seqs), "--host", "127.0.0.1",
                        "--port", str(port)]
                if a.tern_kv_mem:
                    argv += ["--kv-mem", a.tern_kv_mem]
                argv += shlex.split(a.tern_extra)
                env = dict(os.environ)
            else:
                argv = [a.llama_server, "-m", model, "-t", str(a.threads),
                        "-c", str(a.peer_slots * a.ctx),
                        "-np", str(a.peer_slots), "--host", "127.0.0.1",
                        "--port", str(port), "--no-webui"]
                argv += shlex.split(a.peer_extra)
                env = dict(os.environ)
                libdir = os.path.dirname(a.llama_server)
                env["LD_LIBRARY_PATH"] = libdir + (
                    ":" + env["LD_LIBRARY_PATH"]
                    if env.get("LD_LIBRARY_PATH") else "")
            srv = Server(name, argv, env, port, logdir)
            current[0] = srv
            srv.start(a.start_timeout)
            entry = {"argv": argv, "model_id": srv.model_id}
            if not a.no_warmup:
                w = stream_request(port, "/v1/completions",
                                   completion_payload(srv.model_id,
                                                      "Warm up. " + body[:200],
                                                      8), a.timeout)
                if not w.ok:
                    raise BenchError(f"{name}: warm-up request failed: "
                                     f"{w.error}\n{srv.tail()}")
            if levels:
                entry["levels"] = run_load(srv, a, prompts_for, levels)
            if a.multi_turn:
                entry["multi_turn"] = run_multi_turn(srv, a, history)
            report["servers"][name] = entry
            srv.stop()
            current[0] = None
    except BenchError as e:
        log(f"bench_serve: {e}")
        rc = 1
    except KeyboardInterrupt:
        log("bench_serve: interrupted")
        rc = 130
    finally:
        if current[0] is not None:
            current[0].stop()
        if a.keep_logs or rc:
            log(f"server logs in {logdir}")
        else:
            for f in os.listdir(logdir):
                os.unlink(os.path.join(logdir, f))
            os.rmdir(logdir)

    t = report["servers"].get(TERN, {}).get("levels")
    p = report["servers"].get(PEER, {}).get("levels")
    if t and p:
        report["ratios"] = [
            {"level": x["level"],
             "throughput_ratio": ratio(x["output_tok_s"], y["output_tok_s"]),
             "ttft_p99_ratio": ratio(x["ttft_p99_s"], y["ttft_p99_s"])}
            for x, y in zip(t, p)]
    if not report["servers"]:
        return rc or 1
    text = table(report)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        work = (f"prompt {a.prompt_tokens} / output {a.output_tokens} "
                f"tokens, " if levels else "")
        if a.multi_turn:
            work += (f"multi-turn history ~{a.history_tokens} tokens, "
                     f"{a.mt_output_tokens} output tokens per turn "
                     f"({a.mt_endpoint}), ")
        print(f"\n{report['command']}\ncommit {commit}, {report['machine']}, "
              f"{os.cpu_count()} cores, threads {a.threads}, {work}"
              f"tern --max-seqs {a.tern_max_seqs}, llama-server -np "
              f"{a.peer_slots}, ctx {a.ctx} per sequence\n")
        print(text)
    if a.results_md and rc == 0:
        append_results_md(report, text)
        log("appended to bench/RESULTS.md")
    return rc


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Structured output: what a grammar costs, tern vs llama-server, and what
early exit saves on classification.

    .venv/bin/python bench/bench_structured.py [--model qwen2.5-coder-0.5b]

Three parts, each server started by the script on the same model and
threads (llama-server from ref/bin, `-np 16`):

 1. one user, JSON schema: the same prompts with the schema (OpenAI
    response_format; llama-server takes it too) and without; decode rate
    (tokens/s after the first token) of each, and the grammar's cost per
    token = 1/rate(constrained) - 1/rate(free);
 2. 16 users, 32 requests: aggregate tokens/s with the schema and without
    (tern only, llama-server too when --peer-load);
 3. classification, 200 prompts with 2-10 labels: the label as a `choice`
    (early exit on), the same with early exit off (logprobs on turns the
    fill off) and free generation of the label; forward passes (decoded
    tokens), latency, and whether the answers agree.

tern's own mask timings come from /metrics (tern_grammar_mask_seconds_total
over tern_grammar_masks_total).
"""
import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"]},
        "skills": {"type": "array", "items": {"type": "string"},
                   "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "skills", "active"],
}

PEOPLE = ["a retired sailor from Lisbon", "a young chemist in Osaka",
          "a baker who runs a shop in Lyon", "a bus driver in Toronto",
          "a violin teacher in Vienna", "a software engineer in Nairobi",
          "a farmer in Iowa", "a nurse in Manila"]

# label phrase -> words; labels are several tokens long, so that early
# exit has a rest to fill once the first token decides
CATEGORIES = {
    "a kind of fruit": ["apple", "banana", "cherry", "mango", "pear", "kiwi"],
    "a vegetable": ["carrot", "onion", "spinach", "potato", "leek",
                    "celery"],
    "a wild or farm animal": ["horse", "tiger", "rabbit", "eagle", "salmon",
                              "beetle"],
    "a means of transport": ["truck", "bicycle", "scooter", "tram",
                             "sailboat", "van"],
    "a color name": ["crimson", "turquoise", "beige", "violet", "amber",
                     "teal"],
    "a country of the world": ["Peru", "Norway", "Kenya", "Vietnam", "Chile",
                               "Egypt"],
    "a musical instrument": ["violin", "trumpet", "drum", "flute", "cello",
                             "harp"],
    "a team or individual sport": ["tennis", "rugby", "hockey", "cricket",
                                   "golf", "fencing"],
    "a workshop tool": ["hammer", "wrench", "chisel", "saw", "pliers",
                        "drill"],
    "a chemical element (metal)": ["copper", "iron", "zinc", "nickel", "tin",
                                   "cobalt"],
}


def classification_set(n=200, seed=7):
    rng = random.Random(seed)
    cats = sorted(CATEGORIES)
    items = []
    for i in range(n):
        k = 2 + i % 9  # 2..10 labels
        labels = rng.sample(cats, k)
        truth = labels[rng.randrange(k)]
        word = rng.choice(CATEGORIES[truth])
        items.append({"word": word, "labels": labels, "truth": truth})
    return items


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, argv, log, env=None):
        self.port = free_port()
        argv = argv + ["--port", str(self.port)]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{argv[0]} exited: "
                         f"{pathlib.Path(log).read_text()[-2000:]}")
            for path in ("/ready", "/health"):
                try:
                    with urllib.request.urlopen(self.base + path,
                                                timeout=1) as r:
                        if r.status == 200:
                            return
                except urllib.error.HTTPError as e:
                    if e.code != 404:
                        break
                except OSError:
                    break
            time.sleep(0.2)
        sys.exit(f"{argv[0]} did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def metrics(self):
        try:
            with urllib.request.urlopen(self.base + "/metrics",
                                        timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out


def chat(srv, content, stream=False, **extra):
    body = {"messages": [{"role": "user", "content": content}],
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    req = urllib.request.Request(srv.base + "/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    if not stream:
        with urllib.request.urlopen(req, timeout=1200) as r:
            d = json.load(r)
        return {"text": d["choices"][0]["message"]["content"],
                "n": d["usage"]["completion_tokens"],
                "t": time.time() - t0}
    first, text, usage = None, "", {}
    with urllib.request.urlopen(req, timeout=1200) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices"):
                delta = d["choices"][0].get("delta", {}).get("content") or ""
                if delta and first is None:
                    first = time.time()
                text += delta
            if d.get("usage"):
                usage = d["usage"]
    end = time.time()
    n = usage.get("completion_tokens", 0)
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0
    return {"text": text, "n": n, "rate": rate, "t": end - t0}


def schema_field(peer):
    return {"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": SCHEMA}}}


def part1(srv, rounds, peer):
    res = {}
    for mode in ("free", "schema"):
        rates, ns = [], []
        for r in range(rounds):
            for who in PEOPLE:
                extra = {"max_tokens": 160}
                prompt = (f"Describe {who} as a JSON object with name, age, "
                          "address (street, city, zip), skills and active.")
                if mode == "schema":
                    extra.update(schema_field(peer))
                out = chat(srv, prompt, stream=True, **extra)
                if mode == "schema":
                    json.loads(out["text"])
                rates.append(out["rate"])
                ns.append(out["n"])
        res[mode] = (statistics.median(rates), sum(ns))
    return res


def part2(srv, peer, n_req=32, users=16):
    """The schema requests first; then the same prompts free, each held to
    the length its constrained answer had (ignore_eos), so both runs decode
    the same number of tokens in the same batch shapes."""
    res = {}
    chat(srv, "Warm up.", max_tokens=8)
    lens = {}
    for mode in ("schema", "free"):
        def one(i):
            extra = {"max_tokens": 128}
            if mode == "schema":
                extra.update(schema_field(peer))
            else:
                extra.update({"max_tokens": max(lens[i], 1),
                              "ignore_eos": True})
            # the mode leads the prompt: no prefix shared across modes
            return chat(srv, f"[{mode} run] Describe "
                        f"{PEOPLE[i % len(PEOPLE)]} (#{i}) as JSON with name, "
                        "age, address, skills, active.", **extra)
        m0 = srv.metrics()
        t0 = time.time()
        with cf.ThreadPoolExecutor(users) as ex:
            outs = list(ex.map(one, range(n_req)))
        dt = time.time() - t0
        m1 = srv.metrics()
        if mode == "schema":
            lens = {i: o["n"] for i, o in enumerate(outs)}
            res["mask_share"] = (
                m1.get("tern_grammar_mask_seconds_total", 0) -
                m0.get("tern_grammar_mask_seconds_total", 0)) / dt
        res[mode] = sum(o["n"] for o in outs) / dt
    return res


def part3(srv, items):
    """Each mode over all items; forced (not decoded) tokens from /metrics."""
    rows = {"choice": [], "choice, no early exit": [],
            "choice, min_prob 0.9": [], "free text": []}
    answers = {k: [] for k in rows}
    forced = {}
    for mode in rows:
        f0 = srv.metrics().get("tern_grammar_forced_tokens_total", 0)
        for it in items:
            q = (f"What is '{it['word']}'? Answer with exactly one of: "
                 + "; ".join(it["labels"]) + ".")
            extra = {"max_tokens": 24}
            if mode != "free text":
                extra["structured_outputs"] = {"choice": it["labels"]}
            if mode == "choice, no early exit":
                extra["logprobs"] = True
            if mode == "choice, min_prob 0.9":
                extra["early_exit"] = {"min_prob": 0.9}
            out = chat(srv, q, **extra)
            rows[mode].append(out)
            answers[mode].append(out["text"].strip().strip(".;").lower())
        forced[mode] = srv.metrics().get("tern_grammar_forced_tokens_total",
                                         0) - f0
    return rows, answers, forced


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--llama-server",
                    default=str(ROOT / "ref" / "bin" / "llama-server"))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-load", action="store_true",
                    help="also run the 16-user part on llama-server")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--parts", default="123",
                    help="which parts to run (e.g. 2)")
    a = ap.parse_args()
    r = subprocess.run([a.tern, "models", "--json"], capture_output=True)
    path = next((m["path"] for m in json.loads(r.stdout)
                 if m["name"] == a.model and m.get("downloaded")), None)
    if not path:
        sys.exit(f"{a.model} not downloaded (tern pull {a.model})")
    logdir = pathlib.Path("/tmp")
    print(f"# structured output, {a.model}, {a.threads} threads, "
          f"{time.strftime('%Y-%m-%d')}\n")

    tern = Server([a.tern, "serve", "-m", path, "-t", str(a.threads),
                   "--ctx", "4096", "--max-seqs", "16", "--host",
                   "127.0.0.1"], logdir / "bench_structured_tern.log")
    m0 = tern.metrics()
    t1 = part1(tern, a.rounds, False) if "1" in a.parts else None
    m1 = tern.metrics()
    masks = m1.get("tern_grammar_masks_total", 0) - m0.get(
        "tern_grammar_masks_total", 0)
    mask_s = m1.get("tern_grammar_mask_seconds_total", 0) - m0.get(
        "tern_grammar_mask_seconds_total", 0)
    hits = m1.get("tern_grammar_mask_cache_hits_total", 0) - m0.get(
        "tern_grammar_mask_cache_hits_total", 0)
    t2 = part2(tern, False) if "2" in a.parts else None
    tern.stop()
    # classification: the same prompts run in three modes, so the prefix
    # cache would favour the later ones; it is off here
    tern = Server([a.tern, "serve", "-m", path, "-t", str(a.threads),
                   "--ctx", "4096", "--host", "127.0.0.1",
                   "--no-prefix-cache"], logdir / "bench_structured_tern2.log")
    items = classification_set(a.items)
    chat(tern, "Warm up.", max_tokens=4)
    rows, answers, forced = part3(tern, items) if "3" in a.parts else (
        {}, {}, {})
    tern.stop()

    peer1 = peer2 = None
    if not a.no_peer:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.path.dirname(a.llama_server)
        peer = Server([a.llama_server, "-m", path, "-t", str(a.threads),
                       "-c", str(16 * 4096), "-np", "16", "--host",
                       "127.0.0.1", "--no-webui"],
                      logdir / "bench_structured_peer.log", env)
        peer1 = part1(peer, a.rounds, True) if "1" in a.parts else None
        if a.peer_load and "2" in a.parts:
            peer2 = part2(peer, True)
        peer.stop()

    def cost_ms(res):
        f, s = res["free"][0], res["schema"][0]
        return (1 / s - 1 / f) * 1e3 if f and s else float("nan")

    if t1:
        print("## one user, JSON schema (nested, 5 required fields)\n")
        print("| server | free tok/s | schema tok/s | schema/free | grammar cost "
              "per token |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, res in (("tern", t1), ("llama-server", peer1)):
            if not res:
                continue
            print(f"| {name} | {res['free'][0]:.1f} | {res['schema'][0]:.1f} | "
                  f"{res['schema'][0] / res['free'][0]:.3f} | "
                  f"{cost_ms(res):.2f} ms |")
        if masks:
            print(f"\ntern masks: {int(masks)} in {mask_s * 1e3:.1f} ms "
                  f"({mask_s / masks * 1e3:.3f} ms each, {hits / masks:.0%} from "
                  "the mask cache, first request included)")
    if t2:
        print("\n## 16 users, 32 requests of up to 128 tokens (free: the same "
              "lengths)\n")
        print("| server | free tok/s | schema tok/s | schema/free | mask time "
              "share |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, res in (("tern", t2), ("llama-server", peer2)):
            if res:
                share = (f"{res['mask_share']:.1%}" if name == "tern" else "-")
                print(f"| {name} | {res['free']:.1f} | {res['schema']:.1f} | "
                      f"{res['schema'] / res['free']:.3f} | {share} |")
    if not rows:
        return
    print(f"\n## classification, {len(items)} prompts, 2-10 labels (tern)\n")
    print("| mode | decoded tokens | mean latency | p90 latency | answer "
          "is a label | accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, outs in rows.items():
        lat = sorted(o["t"] for o in outs)
        labels_ok = sum(a in [x.lower() for x in it["labels"]]
                        for a, it in zip(answers[mode], items))
        acc = sum(a == it["truth"] for a, it in zip(answers[mode], items))
        decoded = sum(o["n"] for o in outs) - int(forced[mode])
        print(f"| {mode} | {decoded} | "
              f"{statistics.mean(lat) * 1e3:.0f} ms | "
              f"{lat[int(0.9 * len(lat))] * 1e3:.0f} ms | "
              f"{labels_ok}/{len(items)} | {acc}/{len(items)} |")
    same = sum(x == y for x, y in zip(answers["choice"],
                                      answers["choice, no early exit"]))
    same_p = sum(x == y for x, y in zip(answers["choice, min_prob 0.9"],
                                        answers["choice, no early exit"]))
    print(f"\nmin_prob 0.9 vs decoding to the end: same answer on "
          f"{same_p}/{len(items)}")
    print(f"\nearly exit vs none: same answer on {same}/{len(items)}; "
          f"{int(forced['choice'])} tokens forced (appended without a "
          "forward pass; usage counts them, decoded tokens above do not)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Cascades and routers on a labelled question set: accuracy against cost.

    python3 bench/bench_cascade.py [--tern build/tern] [--threads 2]
        [--runs /tmp/cascade_runs.json] [--live 40]

bench/data/route_eval.jsonl (tools/build_route_eval.py: capitals and
continents from the countryinfo package, generated arithmetic and Python
expressions; split in calibration and test halves) is asked of each model
alone through one `tern serve --config` (greedy, max_tokens 16, logprobs
with the top 2 alternatives), one request at a time so each one's compute
time is its own. A request's cost is its measured time at one price per
second of the machine (the "price derived from measured compute time"):
so the numbers are relative, and the largest model's cost is the unit.

Because tern's greedy output does not depend on batching, the stage
answers a cascade would get are the ones each model gave alone: the
cascade at any thresholds is computed from these runs, and a live check
(--live N test items through a real cascade route at two calibrated
thresholds, and at -inf/+inf) confirms tern's route answers exactly what
the computation says. Reported on the test split:
- each model alone: accuracy, mean cost;
- the cascade SmolLM2 -> Qwen2.5-Coder 0.5B -> 1.5B for each signal
  (min_prob, quantile 0.1, mean_logprob, margin), thresholds calibrated on
  the calibration split (the cheapest pair reaching 90% of the 1.5B's
  calibration accuracy), and a curve of accuracy against cost;
- a random router with the cascade's answer shares, the classifier
  router (k nearest calibration questions, labelled with the cheapest
  model that answered right, embedded by SmolLM2 through /v1/embeddings);
- AUROC of each signal against correctness, per model.
"""
import argparse
import itertools
import json
import math
import os
import pathlib
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata

import requests

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "route_eval.jsonl"
MODELS = [("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
          ("qwen-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
          ("qwen-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")]
SIGNALS = ["min_prob", "quantile", "mean_logprob", "margin"]
# the agreement signal (--agreement K): K samples of SAMPLE_TOKENS at
# SAMPLE_TEMP, seeded as tern's cascade seeds them (0x5a3e1 + the stage)
SAMPLE_TOKENS = 8
SAMPLE_TEMP = 0.7


# ---- checking answers

def norm(s):
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    return re.sub(r"[^a-z0-9]", "", s.lower())


def check(item, text):
    t = text.strip()
    first = t.splitlines()[0] if t else ""
    if "=" in first:  # "16 + 9 = 25": what follows the last '='
        first = first.rsplit("=", 1)[1]
    if item["check"] == "number":
        m = re.search(r"-?\d[\d,]*", first)
        return bool(m) and m.group(0).replace(",", "") == item["answer"]
    if item["check"] == "contains":
        return norm(item["answer"]) in norm(t)
    if item["check"] == "continent":
        a = item["answer"]
        ok = [a] + (["North America", "South America", "Central America",
                     "America"] if a == "Americas" else [])
        return any(norm(x) in norm(t) for x in ok)
    # python: the value as str() or repr(), quotes and backticks aside
    t = first.strip().strip("`").strip()
    if t.startswith("python"):
        t = t[6:].strip()
    first = t.splitlines()[0].strip() if t else ""
    cands = {first, first.strip("'\""), first.rstrip(".")}
    return item["answer"] in cands or repr(item["answer"]) in cands


# ---- signals (the same definitions as src/router/router.c)

def signal(name, toks):
    if not toks:
        return math.inf
    lps = [t["logprob"] for t in toks]
    if name == "min_prob":
        return min(math.exp(x) for x in lps)
    if name == "mean_logprob":
        return sum(lps) / len(lps)
    if name == "margin":
        m = []
        for t in toks:
            top = t.get("top_logprobs") or []
            p1 = math.exp(top[0]["logprob"]) if top else math.exp(t["logprob"])
            p2 = math.exp(top[1]["logprob"]) if len(top) > 1 else 0.0
            m.append(p1 - p2)
        return min(m)
    ps = sorted(math.exp(x) for x in lps)  # quantile 0.1, nearest rank
    k = max(0, math.ceil(0.1 * len(ps)) - 1)
    return ps[min(k, len(ps) - 1)]


def agreement(text, samples):
    """The share of samples agreeing with the answer, as tern's
    tn_cascade_agreement: ends' whitespace ignored; a sample cut at its
    length agrees when the answer starts with it, one that ended when it
    is the whole answer."""
    a = text.strip(" \t\r\n")
    ok = 0
    for s, finish in samples:
        s = s.strip(" \t\r\n")
        ok += a.startswith(s) if finish == "length" else s == a
    return ok / len(samples) if samples else -math.inf


def ask_samples(session, base, model, item, k, stage):
    body = {"model": model, "temperature": SAMPLE_TEMP, "n": k,
            "max_tokens": SAMPLE_TOKENS, "seed": 0x5a3e1 + stage,
            "messages": [{"role": "user", "content": item["question"]}]}
    t0 = time.perf_counter()
    r = session.post(base + "/v1/chat/completions", json=body, timeout=300)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return ([(c["message"]["content"] or "", c["finish_reason"])
             for c in r.json()["choices"]], dt)


def auroc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1 if p > n else 0.5 if p == n else 0
    return wins / (len(pos) * len(neg))


# ---- serving

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(tern, cfg_text, threads, td):
    port = free_port()
    cfg = pathlib.Path(td) / "cfg.yaml"
    cfg.write_text(cfg_text)
    log = open(pathlib.Path(td) / "serve.log", "wb")
    p = subprocess.Popen([tern, "serve", "--config", str(cfg), "--port",
                          str(port), "-t", str(threads)],
                         stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 300:
        if p.poll() is not None:
            raise RuntimeError("tern exited: " +
                               (pathlib.Path(td) / "serve.log").read_text())
        try:
            if requests.get(base + "/ready", timeout=1).status_code == 200:
                return p, base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready")


def ask(session, base, model, item, logprobs=True):
    body = {"model": model, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": item["question"]}]}
    if logprobs:
        body.update({"logprobs": True, "top_logprobs": 2})
    t0 = time.perf_counter()
    r = session.post(base + "/v1/chat/completions", json=body, timeout=300)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    d = r.json()
    ch = d["choices"][0]
    toks = (ch.get("logprobs") or {}).get("content") or []
    return {"text": ch["message"]["content"] or "", "t": dt,
            "toks": [{"logprob": t["logprob"],
                      "top_logprobs": t.get("top_logprobs", [])} for t in toks],
            "usage": d["usage"], "headers": dict(r.headers)}


def config(extra=""):
    lines = ["models:"]
    for name, f in MODELS:
        lines.append(f"  - {{name: {name}, path: {ROOT / 'models' / f}}}")
    return "\n".join(lines) + "\n" + extra


# ---- the analysis

def cascade(items, runs, sig, t1, t2):
    """Per item: (answered by, correct, cost) for thresholds t1, t2."""
    out = []
    for it in items:
        r = [runs[m][it["id"]] for m, _ in MODELS]
        extra = [x.get("cost_s", 0.0) if sig == "agreement" else 0.0
                 for x in r]
        cost = r[0]["cost"] + extra[0]
        if t1 == -math.inf or (t1 != math.inf and r[0]["sig"][sig] >= t1):
            out.append((0, r[0]["ok"], cost))
            continue
        cost += r[1]["cost"] + extra[1]
        if t2 == -math.inf or (t2 != math.inf and r[1]["sig"][sig] >= t2):
            out.append((1, r[1]["ok"], cost))
            continue
        cost += r[2]["cost"]
        out.append((2, r[2]["ok"], cost))
    return out


def summary(res):
    n = len(res)
    return (sum(ok for _, ok, _ in res) / n, sum(c for _, _, c in res) / n,
            [sum(1 for m, _, _ in res if m == k) / n for k in range(3)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="/tmp/cascade_runs.json")
    ap.add_argument("--live", type=int, default=40)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--agreement", type=int, default=0,
                    help="also the agreement signal with K samples (for the "
                         "two deciding stages)")
    args = ap.parse_args()
    signals = SIGNALS + (["agreement"] if args.agreement else [])
    items = [json.loads(l) for l in DATA.read_text().splitlines() if l]
    if args.limit:
        items = items[:args.limit]
    calib = [it for it in items if it["split"] == "calibration"]
    test = [it for it in items if it["split"] == "test"]
    rp = pathlib.Path(args.runs)
    runs = json.loads(rp.read_text()) if rp.exists() else {}
    with tempfile.TemporaryDirectory() as td:
        proc, base = start(args.tern, config(), args.threads, td)
        try:
            s = requests.Session()
            for m, _ in MODELS:
                have = runs.setdefault(m, {})
                todo = [it for it in items if it["id"] not in have]
                t0 = time.time()
                for i, it in enumerate(todo):
                    a = ask(s, base, m, it)
                    have[it["id"]] = {
                        "text": a["text"], "t": a["t"], "toks": a["toks"],
                        "ok": check(it, a["text"]),
                        "completion_tokens": a["usage"]["completion_tokens"]}
                    if i % 100 == 99:
                        rp.write_text(json.dumps(runs))
                rp.write_text(json.dumps(runs))
                if todo:
                    print(f"# {m}: {len(todo)} asked in {time.time()-t0:.0f} s",
                          file=sys.stderr)
            # the agreement samples of the deciding stages, and how today's
            # machine times a plain request against the stored runs' (the
            # samples' cost in the stored runs' units)
            for stage, (m, _) in enumerate(MODELS[:2] if args.agreement
                                           else []):
                have = runs[m]
                key = f"samples{args.agreement}"
                todo = [it for it in items if key not in have[it["id"]]]
                t0 = time.time()
                for i, it in enumerate(todo):
                    smp, dt = ask_samples(s, base, m, it, args.agreement,
                                          stage)
                    have[it["id"]][key] = smp
                    have[it["id"]][key + "_t"] = dt
                    if i % 100 == 99:
                        rp.write_text(json.dumps(runs))
                rp.write_text(json.dumps(runs))
                if todo:
                    print(f"# {m}: samples for {len(todo)} in "
                          f"{time.time()-t0:.0f} s", file=sys.stderr)
                ratio = []
                for it in items[:20]:
                    ratio.append(ask(s, base, m, it)["t"] / have[it["id"]]["t"])
                runs.setdefault("_scale", {})[m] = statistics.median(ratio)
            # the classifier router's embeddings (SmolLM2, mean)
            embs = {}
            for k in range(0, len(items), 32):
                chunk = items[k:k + 32]
                r = s.post(base + "/v1/embeddings", timeout=300, json={
                    "model": "smollm2",
                    "input": [it["question"] for it in chunk]}).json()
                for it, d in zip(chunk, r["data"]):
                    embs[it["id"]] = d["embedding"]
        finally:
            proc.terminate()
            proc.wait()
    # cost: measured seconds, the largest model's mean as the unit
    unit = statistics.mean(runs[MODELS[2][0]][it["id"]]["t"] for it in items)
    for m, _ in MODELS:
        for it in items:
            r = runs[m][it["id"]]
            r["ok"] = check(it, r["text"])  # the checker as it is now
            r["cost"] = r["t"] / unit
            r["sig"] = {g: signal(g, r["toks"]) for g in SIGNALS}
            key = f"samples{args.agreement}"
            if args.agreement and key in r:
                r["sig"]["agreement"] = agreement(r["text"], r[key])
                r["cost_s"] = r[key + "_t"] / runs["_scale"][m] / unit
            else:
                r["sig"]["agreement"] = math.nan
    print(f"items: {len(items)} ({len(calib)} calibration, {len(test)} test); "
          f"cost unit: the 1.5B's mean request, {unit*1e3:.0f} ms on this "
          "machine")
    print("\n## Each model alone (test split)\n")
    print("| model | accuracy | mean cost | by topic |")
    print("| --- | --- | --- | --- |")
    alone = {}
    for m, _ in MODELS:
        acc = statistics.mean(runs[m][it["id"]]["ok"] for it in test)
        cost = statistics.mean(runs[m][it["id"]]["cost"] for it in test)
        alone[m] = (acc, cost)
        topics = sorted({it["topic"] for it in test})
        bt = ", ".join(
            f"{t} {statistics.mean(runs[m][it['id']]['ok'] for it in test if it['topic'] == t):.2f}"
            for t in topics)
        print(f"| {m} | {acc:.3f} | {cost:.3f} | {bt} |")
    big_acc_cal = statistics.mean(runs[MODELS[2][0]][it["id"]]["ok"]
                                  for it in calib)
    print("\n## AUROC of each signal against correctness (test split)\n")
    print("| model | " + " | ".join(signals) + " |")
    print("| --- |" + " --- |" * len(signals))
    for m, _ in MODELS:
        labels = [runs[m][it["id"]]["ok"] for it in test]
        row = [auroc([runs[m][it["id"]]["sig"][g] for it in test], labels)
               for g in signals]
        print(f"| {m} | " + " | ".join(
            "-" if math.isnan(x) or math.isnan(
                runs[m][test[0]["id"]]["sig"][g]) else f"{x:.3f}"
            for x, g in zip(row, signals)) + " |")
    if args.agreement:
        print(f"\n(agreement: {args.agreement} samples of {SAMPLE_TOKENS} "
              f"tokens at temperature {SAMPLE_TEMP}; their time, scaled to "
              "the stored runs' machine speed "
              + ", ".join(f"{m} x{v:.2f}" for m, v in runs["_scale"].items())
              + ", is added to each deciding stage's cost)")
    # calibration: per signal, a grid of quantiles of each stage's signal
    print("\n## Cascade SmolLM2 -> 0.5B -> 1.5B, thresholds calibrated on "
          "the calibration split (target: 90% of the 1.5B's accuracy at the "
          "least cost)\n")
    print("| signal | t1 | t2 | test accuracy | vs 1.5B | test cost | vs 1.5B "
          "| answered by (S / 0.5B / 1.5B) | random escalation, same shares "
          "(same cost): accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    best = None
    curves = {}
    for g in signals:
        def grid(mi):
            v = sorted(runs[MODELS[mi][0]][it["id"]]["sig"][g] for it in calib)
            qs = [v[int(q * (len(v) - 1))] for q in
                  [i / 20 for i in range(21)]]
            return sorted(set(qs)) + [math.inf]
        cands = []
        for t1, t2 in itertools.product(grid(0), grid(1)):
            acc, cost, _ = summary(cascade(calib, runs, g, t1, t2))
            cands.append((cost, -acc, t1, t2))
        ok = sorted(c for c in cands if -c[1] >= 0.9 * big_acc_cal)
        pick = ok[0] if ok else sorted(cands, key=lambda c: c[1])[0]
        _, _, t1, t2 = pick
        acc, cost, shares = summary(cascade(test, runs, g, t1, t2))
        # the same escalation shares, chosen at random: the same stages run
        # (the same cost); the expected accuracy is the shares' mix
        racc = sum(sh * alone[m][0] for sh, (m, _) in zip(shares, MODELS))
        rcost = cost
        big = alone[MODELS[2][0]]
        print(f"| {g} | {t1:.4g} | {t2:.4g} | {acc:.3f} | {acc/big[0]:.0%} | "
              f"{cost:.3f} | {cost/big[1]:.0%} | "
              + " / ".join(f"{x:.0%}" for x in shares)
              + f" | {racc:.3f} |")
        # the curve: the calibration's Pareto front (no other pair is both
        # cheaper and more accurate), each point measured on the test split
        front, top = [], -1.0
        for c in sorted(cands):
            if -c[1] > top + 1e-12:
                front.append(c)
                top = -c[1]
        curves[g] = [summary(cascade(test, runs, g, c[2], c[3]))[:2]
                     for c in front]
        if best is None or (acc >= 0.9 * big[0] and cost < best[1]):
            best = (g, cost, t1, t2, acc, shares)
    # random router at every cost: the cascade beats it?
    print("\n## Accuracy against cost (test split): the cascade's points, "
          "and the best direct random mix of the models alone at the same "
          "cost (which need not run the small models first)\n")
    for g in signals:
        worse = 0
        for acc, cost in sorted(curves[g], key=lambda x: x[1]):
            # the random router mixing the three models at this cost: best
            # accuracy over mixes with this expected cost (two-model mixes)
            racc = 0
            ms = [alone[m] for m, _ in MODELS]
            for a, b in itertools.combinations(range(3), 2):
                (aa, ac), (ba, bc) = ms[a], ms[b]
                if min(ac, bc) <= cost <= max(ac, bc) and ac != bc:
                    w = (cost - ac) / (bc - ac)
                    racc = max(racc, (1 - w) * aa + w * ba)
            if cost >= ms[2][1]:
                racc = max(racc, ms[2][0])
            worse += acc < racc - 1e-9
        pts = sorted(curves[g], key=lambda x: x[1])
        print(f"- {g}: {len(pts)} Pareto points (calibration), on test from "
              f"cost {pts[0][1]:.3f} to {pts[-1][1]:.3f}: " +
              ", ".join(f"({c:.2f}, {a:.3f})" for a, c in pts[::max(1, len(pts) // 8)])
              + f"; below the best random mix at the same cost: {worse}")
    # two-stage cascades and the oracle bound (a perfect signal)
    print("\n## Two-stage cascades into the 1.5B, and the best any signal "
          "could do (test split)\n")
    print("| first stage | signal | threshold (calibrated) | accuracy | vs "
          "1.5B | cost | vs 1.5B | oracle (accepts exactly the right first answers) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    big = alone[MODELS[2][0]]
    for first in (0, 1):
        fm = MODELS[first][0]
        def two(its, g, t):
            out = []
            for it in its:
                a, b = runs[fm][it["id"]], runs[MODELS[2][0]][it["id"]]
                ac = a["cost"] + (a.get("cost_s", 0.0) if g == "agreement"
                                  else 0.0)
                if t != math.inf and (t == -math.inf or a["sig"][g] >= t):
                    out.append((first, a["ok"], ac))
                else:
                    out.append((2, b["ok"], ac + b["cost"]))
            return out
        # oracle: accept exactly the first stage's right answers
        orc = [(0, True, runs[fm][it["id"]]["cost"]) if runs[fm][it["id"]]["ok"]
               else (2, runs[MODELS[2][0]][it["id"]]["ok"],
                     runs[fm][it["id"]]["cost"] +
                     runs[MODELS[2][0]][it["id"]]["cost"]) for it in test]
        oacc, ocost, _ = summary(orc)
        for g in signals:
            v = sorted(runs[fm][it["id"]]["sig"][g] for it in calib)
            grid = sorted(set(v[int(q * (len(v) - 1))] for q in
                              [i / 40 for i in range(41)])) + [math.inf]
            cs = [(summary(two(calib, g, t))[1], -summary(two(calib, g, t))[0],
                   t) for t in grid]
            ok = sorted(c for c in cs if -c[1] >= 0.9 * big_acc_cal)
            t = (ok[0] if ok else sorted(cs, key=lambda c: c[1])[0])[2]
            acc, cost, _ = summary(two(test, g, t))
            print(f"| {fm} | {g} | {t:.4g} | {acc:.3f} | {acc/big[0]:.0%} | "
                  f"{cost:.3f} | {cost/big[1]:.0%} | accuracy {oacc:.3f} at "
                  f"cost {ocost:.3f} ({ocost/big[1]:.0%}) |")
    # classifier router
    def cheapest_ok(it):
        for k, (m, _) in enumerate(MODELS):
            if runs[m][it["id"]]["ok"]:
                return k
        return 2
    def cosv(a, b):
        return sum(x * y for x, y in zip(a, b))
    res = []
    for it in test:
        sims = sorted(((cosv(embs[it["id"]], embs[c["id"]]), cheapest_ok(c))
                       for c in calib), reverse=True)[:5]
        votes = [0.0] * 3
        for sm, lab in sims:
            votes[lab] += max(sm, 0)
        k = max(range(3), key=lambda i: (votes[i], -i))
        r = runs[MODELS[k][0]][it["id"]]
        res.append((k, r["ok"], r["cost"]))
    acc, cost, shares = summary(res)
    print(f"\nclassifier router (k=5 over calibration questions embedded by "
          f"SmolLM2): test accuracy {acc:.3f}, cost {cost:.3f}, answered by "
          + " / ".join(f"{x:.0%}" for x in shares))
    if best:
        print(f"\nbest cascade: {best[0]} t1={best[2]:.4g} t2={best[3]:.4g}: "
              f"accuracy {best[4]:.3f}, cost {best[1]:.3f}")
    # live: tern's cascade route gives what the computation says
    if args.live and best:
        g, _, t1, t2, _, _ = best
        sub = test[:args.live]
        checks = [(t1, t2), (-math.inf, -math.inf), (math.inf, math.inf)]
        def f(x):
            return ".inf" if x == math.inf else "-.inf" if x == -math.inf \
                else repr(x)
        extra = "routes:\n"
        for i, (a, b) in enumerate(checks):
            more = (f", samples: {args.agreement}, sample_tokens: "
                    f"{SAMPLE_TOKENS}, sample_temperature: {SAMPLE_TEMP}"
                    if g == "agreement" else "")
            extra += (f"  - name: c{i}\n    strategy: cascade\n    stages:\n"
                      f"      - {{model: smollm2, signal: {g}, "
                      f"threshold: {f(a)}{more}}}\n"
                      f"      - {{model: qwen-0.5b, signal: {g}, "
                      f"threshold: {f(b)}{more}}}\n"
                      f"      - {{model: qwen-1.5b}}\n")
        with tempfile.TemporaryDirectory() as td:
            proc, base = start(args.tern, config(extra), args.threads, td)
            try:
                s = requests.Session()
                same = total = 0
                for i, (a, b) in enumerate(checks):
                    want = cascade(sub, runs, g, a, b)
                    for it, (k, _, _) in zip(sub, want):
                        got = ask(s, base, f"c{i}", it, logprobs=False)
                        total += 1
                        same += (got["headers"].get("x-tern-model") ==
                                 MODELS[k][0] and got["text"] ==
                                 runs[MODELS[k][0]][it["id"]]["text"])
            finally:
                proc.terminate()
                proc.wait()
        print(f"\nlive check through tern's cascade route ({len(sub)} test "
              f"items x 3 threshold pairs: calibrated, -inf, +inf): "
              f"{same}/{total} answered by the computed model with the same "
              "text")


if __name__ == "__main__":
    sys.exit(main())

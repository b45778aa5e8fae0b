#!/usr/bin/env python3
"""Prefill (pp) and decode (tg) speed: tern vs llama.cpp's llama-bench.

Both run in this script, on the same machine, model, threads and sizes,
one after the other, alternating (tern, llama, tern, llama) so drift in
machine load hits both. Prints a markdown table with the ratios and, with
--write, appends it to bench/RESULTS.md with date, commit and command.

  python3 bench/bench_engine.py --models smollm2-135m qwen2.5-coder-0.5b \
      --threads 1 2 [--write]
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

FILES = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-Q4_K_M.gguf",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}


def run_tern(tern, model, t, p, n, reps):
    out = subprocess.run([tern, "bench", "-m", model, "-t", str(t), "-p",
                          str(p), "-n", str(n), "-r", str(reps), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_llama(llama_bench, model, t, p, n, reps):
    res = {}
    for pp, tg in ((p, 0), (0, n)):
        out = subprocess.run([llama_bench, "-m", model, "-t", str(t), "-p",
                              str(pp), "-n", str(tg), "-r", str(reps), "-o",
                              "json"], check=True, capture_output=True,
                             text=True).stdout
        rec = json.loads(out)[0]
        res["pp_tok_s" if pp else "tg_tok_s"] = rec["avg_ts"]
    return res


def membw(root, threads):
    exe = root / "build" / "tern-membw"
    out = subprocess.run([str(exe), str(threads), "1024"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["read_gb_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating tern/llama rounds; medians reported")
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--llama-bench", default=str(ROOT / "ref" / "bin" / "llama-bench"))
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    bw = {t: membw(ROOT, t) for t in a.threads}
    rows = []
    for name in a.models:
        path = str(ROOT / "models" / FILES.get(name, name))
        for t in a.threads:
            tr, lr = [], []
            for _ in range(a.rounds):
                tr.append(run_tern(a.tern, path, t, a.p, a.n, a.r))
                lr.append(run_llama(a.llama_bench, path, t, a.p, a.n, a.r))
            tp = statistics.median(x["pp_tok_s"] for x in tr)
            tt = statistics.median(x["tg_tok_s"] for x in tr)
            lp = statistics.median(x["pp_tok_s"] for x in lr)
            lt = statistics.median(x["tg_tok_s"] for x in lr)
            wb = tr[0]["weight_bytes"]
            limit = bw[t] * 1e9 / wb
            rows.append((name, t, tp, lp, tp / lp, tt, lt, tt / lt,
                         100.0 * tt / limit, tr[0]["load_s"],
                         tr[0]["peak_rss_mib"]))
            print(f"{name} t={t}: pp {tp:.1f} vs {lp:.1f} ({tp/lp:.2f}x), "
                  f"tg {tt:.1f} vs {lt:.1f} ({tt/lt:.2f}x), "
                  f"tg at {100*tt/limit:.0f}% of the bandwidth limit",
                  flush=True)
    date = datetime.date.today().isoformat()
    cmd = "python3 bench/bench_engine.py " + " ".join(sys.argv[1:])
    lines = [
        f"### Engine: pp{a.p} / tg{a.n}, {date}, commit {commit}",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, read bandwidth "
        + ", ".join(f"{bw[t]:.1f} GB/s with {t} thread{'s' if t > 1 else ''}"
                    for t in a.threads)
        + f" (build/tern-membw). Peer: llama.cpp llama-bench from the "
        f"llama-cpp-python source package (ref/VERSION). Each cell is the "
        f"median of {a.rounds} alternating rounds of -r {a.r}.",
        f"Command: `{cmd}`",
        "",
        "| model | threads | tern pp t/s | llama.cpp pp t/s | pp ratio | "
        "tern tg t/s | llama.cpp tg t/s | tg ratio | tern tg % of bw limit | "
        "load s | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append("| %s | %d | %.1f | %.1f | **%.2fx** | %.1f | %.1f | "
                     "**%.2fx** | %.0f%% | %.2f | %.0f |" % r)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()

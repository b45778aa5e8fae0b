#!/usr/bin/env python3
"""Which model should a new user pick? Answers to five everyday questions
and decode speed, for every model `tern models` knows.

    python3 bench/bench_models.py [--tern build/tern] [--threads 2]
                                  [--models NAME ...] [--markdown]

Each question goes through `tern run --chat --temp 0` (greedy, so the table
is repeatable). A base model (no chat template) gets the question as a
completion prompt, "Question: ...\\nAnswer:", and stops at the next line
that starts a question. Speed is the decode rate tern prints on stderr
(tokens after the first over the time after the first), the median over
the five answers; the same run also prints llama.cpp's decode rate for the
model (llama-bench tg64 with the same threads, when ref/bin/llama-bench
exists) so the ratio is from one run on one machine.

The answers are printed as they are: judging them is the reader's part
(README.md's table quotes them).
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "If I have 3 apples and eat one, how many are left?",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Write a haiku about the sea.",
]


def run(tern, args, timeout=600):
    return subprocess.run([tern, *args], capture_output=True, timeout=timeout)


def catalog(tern):
    r = run(tern, ["models", "--json"])
    if r.returncode != 0:
        sys.exit(r.stderr.decode())
    return json.loads(r.stdout)


def decode_rate(stderr):
    m = re.search(rb"generated (\d+) tokens in [\d.]+ s \(([\d.]+) tok/s\)",
                  stderr)
    return (int(m.group(1)), float(m.group(2))) if m else (0, 0.0)


def llama_bench_tg(path, threads):
    exe = ROOT / "ref" / "bin" / "llama-bench"
    if not exe.exists():
        return None
    r = subprocess.run([str(exe), "-m", path, "-t", str(threads), "-p", "0",
                        "-n", "64", "-r", "3", "-o", "json"],
                       capture_output=True, timeout=1200)
    if r.returncode != 0:
        return None
    for rec in json.loads(r.stdout):
        if rec.get("n_gen") == 64:
            return rec["avg_ts"]
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    models = [m for m in catalog(a.tern)
              if m.get("downloaded") and (not a.models or m["name"] in a.models)]
    results = []
    for m in models:
        base = m.get("kind") == "base"
        answers, rates = [], []
        for q in QUESTIONS:
            args = ["run", "-m", m["name"], "-t", str(a.threads), "--temp",
                    "0", "-n", str(a.tokens), "-v"]
            if base:
                args += ["-p", f"Question: {q}\nAnswer:", "--stop",
                         "\nQuestion:", "--stop", "\n\n"]
            else:
                args += ["--chat", "-p", q]
            r = run(a.tern, args)
            if r.returncode != 0:
                sys.exit(f"{m['name']}: {r.stderr.decode()}")
            text = r.stdout.decode().strip()
            n, rate = decode_rate(r.stderr)
            if n > 8:
                rates.append(rate)
            answers.append(text)
            print(f"[{m['name']}] {q}\n  -> {text!r} ({n} tokens, {rate:.1f} tok/s)",
                  file=sys.stderr, flush=True)
        peer = llama_bench_tg(m["path"], a.threads)
        results.append({"model": m["name"], "kind": m.get("kind"),
                        "size": m.get("size"), "answers": answers,
                        "tok_s": statistics.median(rates) if rates else None,
                        "llama_cpp_tg64": peer})
    if a.markdown:
        head = "| question | " + " | ".join(
            f"`{r['model']}` ({r['kind']})" for r in results) + " |"
        print(head)
        print("|" + " --- |" * (len(results) + 1))
        for i, q in enumerate(QUESTIONS):
            cells = []
            for r in results:
                t = r["answers"][i].replace("\n", " ").replace("|", "\\|")
                cells.append(t if len(t) <= 90 else t[:87] + "...")
            print(f"| {q} | " + " | ".join(cells) + " |")
        def fmt(r):
            s = f"{r['tok_s']:.1f}" if r["tok_s"] else "?"
            if r["llama_cpp_tg64"]:
                s += f" (llama.cpp {r['llama_cpp_tg64']:.1f})"
            return s
        print(f"| decode tok/s, {a.threads} threads | " +
              " | ".join(fmt(r) for r in results) + " |")
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

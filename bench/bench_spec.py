#!/usr/bin/env python3
"""Speculative decoding, one user: tern and llama-server, each with
speculation off and on, same model, same threads, same prompts, one run.

    python3 bench/bench_spec.py [--models qwen2.5-coder-0.5b ...]
        [--threads 2] [--tokens 256] [--rounds 2]
        [--tern-spec "--spec ngram"] [--peer-spec "--spec-type ngram-simple"]

Workloads (greedy, chat endpoint): code editing (the answer repeats most
of the input), renaming in code (the same function with four names
changed: the n-gram drafter learns the renames), summarising with quotes,
and plain chat (--workloads picks some). For each server
the decode rate is completion tokens after the first over the time after
the first streamed token; each cell is the median over rounds. tern's
greedy answers with speculation must equal those without (checked), and
its drafted / accepted tokens come from the usage. Prints a markdown table
with both servers' speedups.
"""
import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

CODE = '''def process(items, threshold, verbose):
    result = []
    count = 0
    for item in items:
        if item.value > threshold:
            result.append(item.name.upper())
            count = count + 1
            if verbose:
                print("kept", item.name, item.value)
        else:
            if verbose:
                print("dropped", item.name, item.value)
    total = 0
    for item in items:
        total = total + item.value
    average = total / len(items) if items else 0
    return result, count, average
'''

TEXT = ("The committee met on Tuesday to review the budget. It approved the "
        "new library wing, which will cost 4.2 million dollars and open in "
        "the spring. It rejected the proposal to close the east pool, citing "
        "strong public support. It asked the city engineer for a report on "
        "the bridge repairs by the end of the month. The next meeting is "
        "scheduled for the first Monday of March at the town hall.")

WORKLOADS = {
    "code edit": "Rename the variables of this Python function to clearer "
                 "names and add type hints. Reply with the whole function "
                 "only.\n\n" + CODE,
    "code rename": "In this Python function rename `result` to "
                   "`kept_names`, `count` to `n_kept`, `total` to "
                   "`value_sum` and `item` to `entry`; change nothing "
                   "else. Reply with the whole function only.\n\n" + CODE,
    "summary, quoting": "Copy the sentences of this text that contain a "
                        "decision, word for word, one per line:\n\n" + TEXT,
    "chat": "Explain in a few sentences why the sky is blue.",
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, argv, port, log):
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{argv[0]} exited: {pathlib.Path(log).read_text()[-2000:]}")
            # tern: /ready once loaded; llama-server: /health (503 while
            # loading, and no /ready)
            ok = False
            for path in ("/ready", "/health"):
                try:
                    with urllib.request.urlopen(self.base + path,
                                                timeout=1) as r:
                        ok = r.status == 200
                        break
                except urllib.error.HTTPError as e:
                    if e.code != 404:
                        break
                except OSError:
                    break
            if ok:
                break
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ask(server, prompt, tokens):
    body = {"messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(server.base + "/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    first = None
    text, usage = "", {}
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
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    det = usage.get("completion_tokens_details") or {}
    return {"text": text, "n": n, "rate": rate, "ttft": (first or end) - t0,
            "accepted": det.get("accepted_prediction_tokens", 0),
            "rejected": det.get("rejected_prediction_tokens", 0)}


def model_path(tern, name):
    r = subprocess.run([tern, "models", "--json"], capture_output=True)
    for m in json.loads(r.stdout):
        if m["name"] == name and m.get("downloaded"):
            return m["path"]
    sys.exit(f"model {name} not downloaded (tern pull {name})")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    ap.add_argument("--llama-server", default=str(ROOT / "ref" / "bin" /
                                                  "llama-server"))
    ap.add_argument("--tern-spec", default="--spec ngram")
    ap.add_argument("--peer-spec", default="--spec-type ngram-simple")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                    default=list(WORKLOADS))
    a = ap.parse_args()
    workloads = {w: WORKLOADS[w] for w in a.workloads}
    logs = tempfile.mkdtemp(prefix="bench_spec_")
    rows = []
    for model in a.models:
        path = model_path(a.tern, model)
        configs = [("tern", "off", [a.tern, "serve", "-m", path, "-t",
                                    str(a.threads), "--ctx", "4096",
                                    "--max-seqs", "1"]),
                   ("tern", "on", [a.tern, "serve", "-m", path, "-t",
                                   str(a.threads), "--ctx", "4096",
                                   "--max-seqs", "1", *a.tern_spec.split()])]
        if not a.no_peer and os.path.exists(a.llama_server):
            peer = [a.llama_server, "-m", path, "-t", str(a.threads), "-c",
                    "4096", "-np", "1", "--no-webui"]
            configs += [("llama-server", "off", peer),
                        ("llama-server", "on", peer + a.peer_spec.split())]
        res = {}
        for server, spec, argv in configs:
            port = free_port()
            argv = argv + ["--port", str(port)]
            if server == "llama-server":
                argv += ["--host", "127.0.0.1"]
            srv = Server(argv, port, os.path.join(logs, f"{server}-{spec}.log"))
            try:
                ask(srv, "Hi", 8)  # warm-up
                for wl, prompt in workloads.items():
                    runs = [ask(srv, prompt, a.tokens) for _ in range(a.rounds)]
                    res[(server, spec, wl)] = {
                        "rate": statistics.median(r["rate"] for r in runs),
                        "text": runs[0]["text"], "n": runs[0]["n"],
                        "accepted": runs[0]["accepted"],
                        "rejected": runs[0]["rejected"]}
                    print(f"{model} {server} spec {spec} {wl}: "
                          f"{res[(server, spec, wl)]['rate']:.1f} tok/s, "
                          f"{runs[0]['n']} tokens, accepted "
                          f"{runs[0]['accepted']} rejected {runs[0]['rejected']}",
                          file=sys.stderr, flush=True)
            finally:
                srv.stop()
        for wl in workloads:
            off, on = res[("tern", "off", wl)], res[("tern", "on", wl)]
            same = off["text"] == on["text"]
            drafted = on["accepted"] + on["rejected"]
            row = {"model": model, "workload": wl, "tern_off": off["rate"],
                   "tern_on": on["rate"], "tern_x": on["rate"] / off["rate"],
                   "identical": same, "tokens": on["n"],
                   "acceptance": on["accepted"] / drafted if drafted else 0.0}
            if ("llama-server", "off", wl) in res:
                po, pn = res[("llama-server", "off", wl)], \
                    res[("llama-server", "on", wl)]
                row.update(peer_off=po["rate"], peer_on=pn["rate"],
                           peer_x=pn["rate"] / po["rate"] if po["rate"] else 0)
            rows.append(row)
    print(f"\n{a.threads} threads, {a.tokens} tokens max, greedy, "
          f"tern `{a.tern_spec}`, llama-server `{a.peer_spec}`, median of "
          f"{a.rounds}\n")
    print("| model | workload | tokens | tern off | tern on | tern speedup | "
          "accepted | identical | llama-server off | on | its speedup |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
          "| ---: |")
    for r in rows:
        peer = (f"{r['peer_off']:.1f} | {r['peer_on']:.1f} | "
                f"**{r['peer_x']:.2f}x**") if "peer_x" in r else "- | - | -"
        print(f"| {r['model']} | {r['workload']} | {r['tokens']} | "
              f"{r['tern_off']:.1f} | {r['tern_on']:.1f} | "
              f"**{r['tern_x']:.2f}x** | {100 * r['acceptance']:.0f}% | "
              f"{'yes' if r['identical'] else 'NO'} | {peer} |")
    print(f"\n(logs in {logs})")


if __name__ == "__main__":
    main()

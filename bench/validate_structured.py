#!/usr/bin/env python3
"""Sampled outputs validate: N requests (default 1000) over the schema corpus
of tests/e2e/test_grammar_reference.py, temperature 1, distinct seeds,
through `tern serve` with a real model; every answer that finished
(finish_reason "stop") must parse and validate against its schema.

    .venv/bin/python bench/validate_structured.py [--model smollm2-135m] [-n 1000]

Prints the counts: finished and valid, finished and invalid (must be 0),
cut by max_tokens (a prefix of a valid answer, as on every server).
"""
import argparse
import concurrent.futures as cf
import json
import pathlib
import subprocess
import sys
import time

import jsonschema
import requests

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_structured import Server  # noqa: E402
from test_grammar_reference import SCHEMAS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tern", default=str(ROOT / "build" / "tern"))
    a = ap.parse_args()
    r = subprocess.run([a.tern, "models", "--json"], capture_output=True)
    path = next((m["path"] for m in json.loads(r.stdout)
                 if m["name"] == a.model and m.get("downloaded")), None)
    if not path:
        sys.exit(f"{a.model} not downloaded (tern pull {a.model})")
    srv = Server([a.tern, "serve", "-m", path, "--max-seqs",
                  str(a.concurrency), "--host", "127.0.0.1"],
                 "/tmp/validate_structured.log")
    model = requests.get(srv.base + "/v1/models").json()["data"][0]["id"]

    def one(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        body = {"model": model, "temperature": 1.0, "seed": i,
                "max_tokens": a.max_tokens,
                "messages": [{"role": "user", "content":
                              "Answer with JSON that fits this schema: "
                              + json.dumps(schema)[:400]}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": f"s{i % len(SCHEMAS)}", "schema": schema}}}
        d = requests.post(srv.base + "/v1/chat/completions", json=body,
                          timeout=600).json()
        if "choices" not in d:
            return "error", (i, d.get("error", {}).get("message", str(d)))
        c = d["choices"][0]
        if c["finish_reason"] != "stop":
            return "cut", None
        try:
            jsonschema.validate(json.loads(c["message"]["content"]), schema)
            return "valid", None
        except Exception as e:  # noqa: BLE001
            return "invalid", (i, str(e)[:200], c["message"]["content"][:200])

    t0 = time.time()
    counts = {"valid": 0, "invalid": 0, "cut": 0, "error": 0}
    bad = []
    with cf.ThreadPoolExecutor(a.concurrency) as ex:
        for kind, info in ex.map(one, range(a.n)):
            counts[kind] += 1
            if info:
                bad.append(info)
    srv.stop()
    print(f"{a.n} sampled answers over {len(SCHEMAS)} schemas ({a.model}, "
          f"temperature 1, max_tokens {a.max_tokens}) in "
          f"{time.time() - t0:.0f} s: {counts['valid']} finished and valid, "
          f"{counts['invalid']} finished and invalid, {counts['cut']} cut by "
          f"max_tokens, {counts['error']} errors")
    for b in bad[:10]:
        print("  failed:", b)
    sys.exit(1 if counts["invalid"] or counts["error"] else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Speculation under load: 16 concurrent clients, 32 completions of 96
tokens (ignore_eos), aggregate tokens/s and drafted tokens.

    python3 bench/bench_spec_load.py build/tern MODEL "" 1.0
    python3 bench/bench_spec_load.py build/tern MODEL "--spec ngram" 1.0

Arguments: the tern binary, the model, extra `tern serve` flags (one
string), the temperature. Run it with and without speculation, alternating,
and compare the totals (the goal: on >= 0.97x off).
"""
import concurrent.futures as cf
import json
import socket
import subprocess
import sys
import time
import urllib.request


def main():
    tern, model, extra, temp = sys.argv[1], sys.argv[2], sys.argv[3], \
        float(sys.argv[4])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([tern, "serve", "-m", model, "-t", "2", "--port",
                          str(port)] + extra.split(),
                         stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.1)

    def ask(i):
        body = {"prompt": f"Story {i}: In a quiet village by the sea, there "
                          "lived", "max_tokens": 96, "temperature": temp,
                "seed": i, "ignore_eos": True}
        r = urllib.request.Request(base + "/v1/completions",
                                   data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(r, timeout=600))["usage"]

    t0 = time.time()
    with cf.ThreadPoolExecutor(16) as ex:
        us = list(ex.map(ask, range(32)))
    dt = time.time() - t0
    n = sum(u["completion_tokens"] for u in us)
    acc = sum(u["completion_tokens_details"]["accepted_prediction_tokens"]
              for u in us)
    rej = sum(u["completion_tokens_details"]["rejected_prediction_tokens"]
              for u in us)
    print(f"{extra or 'off'} temp {temp}: {n / dt:.1f} tok/s, accepted {acc}, "
          f"rejected {rej}")
    p.terminate()
    p.wait()


if __name__ == "__main__":
    main()

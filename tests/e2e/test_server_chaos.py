"""A seeded storm against a small `tern serve`: mixed chat and completions,
streaming and not, n > 1, stop strings, prompts of every length up to the
context, clients that hang up mid-stream or at once, all through a KV pool
so small that preemption, prefix-cache eviction and queueing happen all
the time. Afterwards every greedy answer must equal the same request run
alone, every request that was not abandoned must have a complete answer,
and the server must be back to idle: nothing running or waiting, no KV
block held.
"""
import concurrent.futures as cf
import http.client
import json
import random
import socket
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import model_path, slow_mode

WORDS = ("river stone cloud lamp forest engine paper garden window music "
         "silver orange winter market bridge candle ocean letter mountain "
         "pencil").split()


def gauge(srv, name):
    text = requests.get(srv.base + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} missing from /metrics")


def post(srv, path, body, timeout=300):
    r = requests.post(srv.base + path, json=body, timeout=timeout)
    return r.status_code, r.json()


def stream(srv, path, body, hang_up_after=None):
    """Streams body; returns (status, text by choice, finish by choice) or
    None when it hung up on purpose."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
    conn.request("POST", path, json.dumps(body),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        data = r.read()
        conn.close()
        return r.status, json.loads(data), None
    texts, finish, events = {}, {}, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        events += 1
        if hang_up_after is not None and events >= hang_up_after:
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            return None
        chunk = json.loads(line[6:])
        for ch in chunk["choices"]:
            i = ch["index"]
            piece = ch["delta"].get("content") if "delta" in ch else ch["text"]
            texts[i] = texts.get(i, "") + (piece or "")
            if ch.get("finish_reason"):
                finish[i] = ch["finish_reason"]
    conn.close()
    return 200, texts, finish


def make_request(rng, i, ctx):
    chat = rng.random() < 0.5
    n_words = rng.choice([3, 10, 30, 60, 90])
    words = " ".join(rng.choice(WORDS) for _ in range(n_words))
    # Shared openings make the prefix cache hit (and get evicted) too.
    opening = "A long shared opening about rivers and lamps. " * rng.choice(
        [0, 2, 4])
    text = f"{opening}Note {i}: {words}."
    body = {"max_tokens": rng.choice([1, 4, 12, 24, 40]),
            "temperature": 0 if rng.random() < 0.6 else 0.9,
            "seed": rng.randrange(1 << 30)}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
    else:
        path = "/v1/completions"
        body["prompt"] = text
        body["ignore_eos"] = rng.random() < 0.3
    if rng.random() < 0.25:
        body["n"] = rng.choice([2, 3])
    if rng.random() < 0.2:
        body["stop"] = [rng.choice([".", " the", "\n"])]
    mode = rng.choice(["plain", "stream", "stream", "hangup", "gone"])
    return path, body, mode


def run_one(srv, req):
    path, body, mode = req
    if mode == "plain":
        status, data = post(srv, path, body)
        if status != 200:
            return status, data, None
        texts, finish = {}, {}
        for ch in data["choices"]:
            msg = ch.get("message")
            texts[ch["index"]] = msg["content"] if msg else ch["text"]
            finish[ch["index"]] = ch["finish_reason"]
        return 200, texts, finish
    if mode == "stream":
        return stream(srv, path, dict(body, stream=True))
    if mode == "hangup":
        return stream(srv, path, dict(body, stream=True), hang_up_after=2)
    # "gone": send the whole request and close at once
    s = socket.create_connection(("127.0.0.1", srv.port))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
              f"application/json\r\nContent-Length: {len(data)}\r\n\r\n"
              .encode() + data)
    s.close()
    return None


def test_storm_leaves_no_trace(start_server):
    # 4 MiB of KV = 11 blocks of 16 tokens (SmolLM2: 368,640 bytes each):
    # the context is capped at 176 tokens and a few sequences fill it.
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--kv-mem", "4MiB", "--max-seqs", "6", "--queue",
                       "512", "--step-tokens", "64")
    ctx = 176
    rng = random.Random(1234)
    n_req = 16 if slow_mode() else 48
    reqs = [make_request(rng, i, ctx) for i in range(n_req)]
    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda r: run_one(srv, r), reqs))

    complete = 0
    for req, res in zip(reqs, results):
        path, body, mode = req
        if mode in ("hangup", "gone"):
            continue
        status, texts, finish = res
        if status == 400:
            # only a request that cannot fit the 176-token context
            assert texts["error"]["code"] == "context_length_exceeded", texts
            continue
        assert status == 200, (req, res)
        n = body.get("n", 1)
        assert sorted(texts) == list(range(n)), (req, res)
        assert all(finish.get(i) in ("stop", "length") for i in range(n)), \
            (req, res)
        complete += 1
    assert complete >= n_req // 3

    # Back to idle: cancelled and finished requests hold nothing.
    deadline = time.time() + 30
    while time.time() < deadline:
        if (gauge(srv, "tern_requests_running") == 0 and
                gauge(srv, "tern_requests_waiting") == 0 and
                gauge(srv, "tern_kv_blocks_used") == 0):
            break
        time.sleep(0.2)
    assert gauge(srv, "tern_requests_running") == 0
    assert gauge(srv, "tern_requests_waiting") == 0
    assert gauge(srv, "tern_kv_blocks_used") == 0
    assert gauge(srv, "tern_num_preemptions_total") > 0

    # Greedy answers are what each request gives alone on the idle server.
    checked = 0
    for req, res in zip(reqs, results):
        path, body, mode = req
        if mode not in ("plain", "stream") or body["temperature"] != 0:
            continue
        if res[0] != 200:
            continue
        status, alone, _ = run_one(srv, (path, body, "plain"))
        assert status == 200
        assert alone == res[1], (req, res[1], alone)
        checked += 1
    assert checked >= 5

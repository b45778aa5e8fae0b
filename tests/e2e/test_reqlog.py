"""The request log (tern serve --log-db): one SQLite row per API request,
with the numbers the response reported, written off the serving path, and
read back by `tern logs`.

What is checked, against a real server and real clients:
- every API request leaves exactly one row: answered (plain and
  streamed), refused (400, 404 model, 404 route, 401 without the key) and
  cut off by the client;
- tokens equal the response's usage; status, finish reason and error are
  the ones sent; queue <= TTFT <= end-to-end; request ids match;
- --log-content stores the request body and the answer, and without it
  nothing of the text is stored;
- `tern logs` filters (status, model, since) and its JSON lines equal the
  table's rows;
- SIGKILL in the middle of load leaves a database that passes SQLite's
  integrity check, with no more rows than requests."""
import json
import signal
import sqlite3
import subprocess
import threading
import time

import requests

from conftest import model_path


def rows(db):
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    out = [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY ts, rowid")]
    con.close()
    return out


def wait_rows(db, n, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = rows(db)
        except sqlite3.OperationalError:
            got = []
        if len(got) >= n:
            return got
        time.sleep(0.1)
    return rows(db)


def chat(base, body, **kw):
    return requests.post(base + "/v1/chat/completions", json=body,
                         timeout=120, **kw)


def test_one_row_per_request(start_server, tmp_path, tern_bin):
    db = str(tmp_path / "log.db")
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--log-db", db, "--log-content", "--api-key", "k")
    auth = {"Authorization": "Bearer k"}
    msgs = [{"role": "user", "content": "Name a color."}]
    sent = []
    # ignore_eos: the default temperature samples, and a sampled answer may
    # end before 6 tokens; the finish reason checked below must not depend on it
    r = chat(srv.base, {"messages": msgs, "max_tokens": 6, "ignore_eos": True},
             headers=auth)
    assert r.status_code == 200
    sent.append(("plain", r.json()))
    r = chat(srv.base, {"messages": msgs, "max_tokens": 6, "stream": True,
                        "ignore_eos": True,
                        "stream_options": {"include_usage": True}},
             headers=auth, stream=True)
    usage, rid, text = None, None, ""
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            ev = json.loads(line[6:])
            rid = ev["id"]
            usage = ev.get("usage") or usage
            for ch in ev["choices"]:
                text += ch["delta"].get("content") or ""
    sent.append(("stream", {"id": rid, "usage": usage, "text": text}))
    assert chat(srv.base, {"messages": []}, headers=auth).status_code == 400
    assert chat(srv.base, {"model": "nope", "messages": msgs},
                headers=auth).status_code == 404
    assert requests.get(srv.base + "/v1/nothing", headers=auth).status_code == 404
    assert chat(srv.base, {"messages": msgs}).status_code == 401
    # not API requests: not logged
    requests.get(srv.base + "/health")
    requests.get(srv.base + "/metrics")
    requests.get(srv.base + "/v1/models", headers=auth)
    # a client that goes away mid-stream
    r = chat(srv.base, {"messages": msgs, "max_tokens": 400, "stream": True,
                        "ignore_eos": True}, headers=auth, stream=True)
    next(r.iter_lines())
    r.close()

    got = wait_rows(db, 7)
    assert len(got) == 7, got
    plain, stream, bad, nomodel, noroute, unauth, gone = got
    # answered ones: usage, ids, timings, content
    for row, (_, resp) in zip((plain, stream), sent):
        assert row["status"] == 200 and row["error"] is None, row
        assert row["request_id"] == resp["id"]
        u = resp["usage"]
        assert row["prompt_tokens"] == u["prompt_tokens"]
        assert row["completion_tokens"] == u["completion_tokens"]
        assert row["cached_tokens"] == u["prompt_tokens_details"]["cached_tokens"]
        assert row["finish_reason"] == "length"
        assert 0 <= row["queue_ms"] <= row["ttft_ms"] <= row["e2e_ms"], row
        assert row["itl_mean_ms"] > 0 and row["itl_max_ms"] >= row["itl_mean_ms"]
        assert row["endpoint"] == "/v1/chat/completions"
        assert row["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert "Name a color." in row["prompt"]
    assert plain["output"] == sent[0][1]["choices"][0]["message"]["content"]
    assert stream["output"] == sent[1][1]["text"]
    assert bad["status"] == 400 and "messages" in bad["error"]
    assert nomodel["status"] == 404 and nomodel["model"] == "nope"
    assert noroute["status"] == 404 and noroute["endpoint"] == "/v1/nothing"
    assert unauth["status"] == 401 and "API key" in unauth["error"]
    assert gone["finish_reason"] == "cancelled", gone
    assert gone["completion_tokens"] < 400
    assert gone["error"], gone

    # tern logs: filters and both forms
    def logs(*args):
        p = subprocess.run([tern_bin, "logs", "--db", db, *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout
    js = [json.loads(x) for x in logs("--json", "-n", "0").splitlines()]
    assert [j["request_id"] for j in js] == [g["request_id"] for g in got]
    errs = [json.loads(x) for x in logs("--json", "--status", "error").splitlines()]
    assert {e["status"] for e in errs} >= {400, 404, 401}
    assert all(e["status"] != 200 or e["error"] for e in errs)
    assert len(logs("--json", "--status", "4xx").splitlines()) == 4
    assert len(logs("--json", "--model", "nope").splitlines()) == 1
    assert len(logs("--json", "--since", "1h").splitlines()) == 7
    table = logs("-n", "2").splitlines()
    assert table[0].startswith("time (UTC)") and len(table) == 3
    bad_args = subprocess.run([tern_bin, "logs", "--db", db, "--status", "2yy"],
                              capture_output=True, text=True)
    assert bad_args.returncode == 1 and "--status" in bad_args.stderr


def test_no_content_by_default(start_server, tmp_path):
    db = str(tmp_path / "log.db")
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--log-db", db)
    r = chat(srv.base, {"messages": [{"role": "user", "content": "secret"}],
                        "max_tokens": 3})
    assert r.status_code == 200
    got = wait_rows(db, 1)
    assert len(got) == 1
    assert got[0]["prompt"] is None and got[0]["output"] is None
    assert got[0]["completion_tokens"] == r.json()["usage"]["completion_tokens"]


def test_sigkill_keeps_the_database_sound(tmp_path, tern_bin):
    """SIGKILL under load: the WAL database stays sound and holds no more
    rows than requests were sent (those not yet committed are lost)."""
    from conftest import TernServer
    db = str(tmp_path / "log.db")
    srv = TernServer(tern_bin, ["-m", model_path("smollm2-135m"), "-t", "2",
                                "--log-db", db], str(tmp_path / "serve.log"))
    sent = [0]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                chat(srv.base, {"messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 2})
                sent[0] += 1
            except requests.RequestException:
                return
    ts = [threading.Thread(target=load) for _ in range(4)]
    for t in ts:
        t.start()
    time.sleep(3)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    stop.set()
    for t in ts:
        t.join()
    srv.log.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = con.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    con.close()
    assert 0 < n <= sent[0] + 4, (n, sent[0])


def test_redaction(start_server, tmp_path, run_tern):
    db = str(tmp_path / "log.db")
    r = run_tern("serve", "-m", model_path("smollm2-135m"), "--log-db", db,
                 "--log-redact", "email", timeout=60)
    assert r.returncode == 1 and b"--log-content" in r.stderr
    r = run_tern("serve", "-m", model_path("smollm2-135m"), "--log-db", db,
                 "--log-content", "--log-redact", "a(b", timeout=60)
    assert r.returncode == 1 and b"--log-redact 'a(b'" in r.stderr, r.stderr
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--log-db", db, "--log-content", "--log-redact",
                       "email", "--log-redact", "order-[0-9]+")
    r = chat(srv.base, {"messages": [{"role": "user", "content":
                        "I am ann@corp.example, order-99812 is late"}],
                        "max_tokens": 3})
    assert r.status_code == 200
    got = wait_rows(db, 1)
    assert len(got) == 1
    assert "ann@" not in got[0]["prompt"] and "99812" not in got[0]["prompt"]
    assert "I am [REDACTED], [REDACTED] is late" in got[0]["prompt"]
    # the answer itself is untouched: redaction is for what is stored
    assert r.json()["usage"]["completion_tokens"] == got[0]["completion_tokens"]


def test_price_from_compute_time(start_server, tmp_path):
    """--price-compute (USD per hour of the machine): a request costs its
    share of the engine's passes. At 3600 USD an hour a second costs one
    USD, so the cost reads as seconds: positive, within the request's time,
    larger for a longer answer, and the log's compute_ms agrees with it.
    Concurrent requests' shares add up to no more than the time taken."""
    db = str(tmp_path / "log.db")
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--log-db", db, "--price-compute", "3600")

    def ask(n):
        t0 = time.time()
        r = requests.post(srv.base + "/v1/completions",
                          json={"prompt": "Once upon a time",
                                "max_tokens": n, "temperature": 0,
                                "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["cost"], time.time() - t0

    short, t_short = ask(4)
    long_, t_long = ask(64)
    assert 0 < short <= t_short and 0 < long_ <= t_long
    assert long_ > short
    got = wait_rows(db, 2)
    assert abs(got[0]["compute_ms"] / 1000 - short) < 1e-6, got[0]
    assert abs(got[1]["cost"] - long_) < 1e-9, got[1]
    # four at once: their shares add up to at most the wall time
    t0 = time.time()
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as ex:
        costs = [c for c, _ in ex.map(ask, [32] * 4)]
    wall = time.time() - t0
    assert all(c > 0 for c in costs) and sum(costs) <= wall, (costs, wall)

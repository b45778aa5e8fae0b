"""Shadow deployments through a real `tern serve --config`.

One server, shared by the module: SmolLM2 as the live model `smol` and
again as `twin` (its shadow: greedy answers must match exactly), routes
that answer with `smol` but shadow into faulty upstreams (fault_upstream.py:
HTTP 500, a stall, a refused port, one killed mid-replay), routes with
shares 0 and 0.5, a one-slot queue, and a route relaying a remote
upstream whose answer is compared with a local shadow.

What must hold: the live answer is the one the client would get without
a shadow, whatever the shadow does; every replay ends in exactly one
comparison row (ok, error or timeout) with the numbers that describe it;
a full queue drops and counts; replays never show up as live traffic.
"""
import concurrent.futures as cf
import json
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import TernServer, model_path
from fault_upstream import FaultUpstream

T = 60
Q = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def fault():
    up = FaultUpstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def doomed():
    """An upstream the test kills while a replay waits on it."""
    up = FaultUpstream().start()
    yield up
    up.stop()


def config(base, doomed_base):
    smol = model_path("smollm2-135m")
    return f"""
models:
  - name: smol
    path: {smol}
    shadow: {{target: twin, judge: twin}}
  - name: twin
    path: {smol}
upstreams:
  - {{name: up-ok, base_url: "{base}", model: ok}}
  - {{name: up-500, base_url: "{base}", model: "500"}}
  - {{name: up-stall, base_url: "{base}", model: stall}}
  - {{name: up-dead, base_url: "http://127.0.0.1:1/v1", model: ok}}
  - {{name: up-doomed, base_url: "{doomed_base}", model: stall}}
routes:
  - {{name: r-err, strategy: fallback, targets: [smol],
      shadow: {{target: up-500}}}}
  - {{name: r-stall, strategy: fallback, targets: [smol],
      shadow: {{target: up-stall, timeout_s: 2}}}}
  - {{name: r-dead, strategy: fallback, targets: [smol],
      shadow: {{target: up-dead}}}}
  - {{name: r-doomed, strategy: fallback, targets: [smol],
      shadow: {{target: up-doomed, timeout_s: 120}}}}
  - {{name: r-none, strategy: fallback, targets: [smol],
      shadow: {{target: twin, share: 0}}}}
  - {{name: r-half, strategy: fallback, targets: [smol],
      shadow: {{target: twin, share: 0.5, max_concurrent: 2, queue: 1000}}}}
  - {{name: r-full, strategy: fallback, targets: [smol],
      shadow: {{target: up-stall, timeout_s: 3, queue: 1}}}}
  - {{name: r-up, strategy: fallback, targets: [up-ok],
      shadow: {{target: twin}}}}
"""


@pytest.fixture(scope="module")
def srv(tern_bin, fault, doomed, tmp_path_factory):
    d = tmp_path_factory.mktemp("shadow")
    cfg = d / "shadow.yaml"
    cfg.write_text(config(fault.base, doomed.base))
    s = TernServer(tern_bin, ["--config", str(cfg), "-t", "2", "--log-db",
                              str(d / "log.db"), "--log-content"],
                   str(d / "serve.log"))
    yield s
    rc = s.stop()
    assert rc == 0, s.read_log()[-3000:]


def chat(srv, model, stream=False, headers=None, **kw):
    body = {"model": model, "messages": Q, "max_tokens": 12,
            "temperature": 0, **kw}
    if stream:
        body["stream"] = True
    r = requests.post(srv.base + "/v1/chat/completions", json=body,
                      headers=headers or {}, timeout=T, stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        j = r.json()
        return j["id"], j["choices"][0]["message"]["content"]
    rid, text = None, ""
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        rid = rid or ev.get("id")
        for ch in ev.get("choices", []):
            text += (ch.get("delta") or {}).get("content") or ""
    return rid, text


def shadows(srv, **params):
    r = requests.get(srv.base + "/api/shadows", params={"limit": 500, **params},
                     timeout=T)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def log_rows_until(srv, pred, n, timeout=30):
    """The request log's rows that pred accepts, once there are n of them
    (rows are written after the answer went out, off the serving path)."""
    deadline = time.time() + timeout
    while True:
        rows = [x for x in log_rows(srv) if pred(x)]
        if len(rows) >= n or time.time() > deadline:
            return rows
        time.sleep(0.1)


def wait_rows(srv, source, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = shadows(srv, source=source)
        if len(rows) >= n:
            return rows
        time.sleep(0.2)
    pytest.fail(f"{source}: {len(rows)} of {n} shadow rows after {timeout} s")


def metric(srv, name, **labels):
    text = requests.get(srv.base + "/metrics", timeout=T).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v
                                      for k, v in labels.items()):
                total += s.value
    return total


def log_rows(srv, **params):
    r = requests.get(srv.base + "/api/requests", params={"limit": 500, **params},
                     timeout=T)
    assert r.status_code == 200, r.text
    return r.json()["data"]


# ---- the replay and its comparison

def test_twin_matches_exactly(srv):
    """The same model as its own shadow: greedy answers are equal, overlap
    1, length ratio 1; the judge ran both orders; the replays are logged
    as shadow traffic of their live request, not as live traffic."""
    live = [chat(srv, "smol", max_tokens=8 + i) for i in range(3)]
    rid, text = chat(srv, "smol", stream=True, max_tokens=10)
    live.append((rid, text))
    rows = wait_rows(srv, "smol", 4)
    by_id = {r["request_id"]: r for r in rows}
    for rid, text in live:
        r = by_id[rid]
        assert r["outcome"] == "ok", r
        assert r["model"] == "smol" and r["target"] == "twin"
        assert r["exact"] == 1, r
        assert r["overlap"] == 1.0 and r["len_ratio"] == 1.0
        assert r["live_output"] == text and r["shadow_output"] == text
        assert r["shadow_id"] and r["shadow_id"] != rid
        assert r["verdict"] in ("shadow", "live", "tie"), r
        assert r["live_ms"] > 0 and r["shadow_ms"] > 0
        assert r["shadow_wait_ms"] >= 0
    # the log: each replay (and its two judge calls) names its live request
    reqs = log_rows(srv)
    for rid, _ in live:
        of = [x for x in reqs if x["shadow_of"] == rid]
        assert sorted(x["model"] for x in of) == ["twin"] * 3, of
        assert all(x["status"] == 200 for x in of)
    assert metric(srv, "tern_shadow_replays_total", source="smol",
                  outcome="ok") >= 4
    assert metric(srv, "tern_shadow_exact_matches_total", source="smol") >= 4
    assert metric(srv, "tern_shadow_judge_verdicts_total", source="smol") >= 4
    # the dashboard: agreement for smol; twin has no live traffic at all
    deadline = time.time() + 10  # (the series end with the last whole second)
    while True:
        st = requests.get(srv.base + "/api/stats?window=5m", timeout=T).json()
        g = {x["key"]: x for x in st["groups"]}
        sh = g["smol"]["totals"].get("shadow") or {"compared": 0}
        if sh["compared"] >= 4 or time.time() > deadline:
            break
        time.sleep(0.3)
    assert g["smol"]["totals"]["shadow"]["exact_rate"] == 1.0
    assert g["smol"]["totals"]["shadow"]["compared"] >= 4
    assert 1.0 in g["smol"]["shadow_exact_rate"]
    assert "twin" not in g


def test_relayed_answer_is_compared(srv, fault):
    """A live answer relayed from an upstream (stream or not) is kept as
    it passes and compared with a local shadow."""
    a = chat(srv, "r-up")
    b = chat(srv, "r-up", stream=True)
    assert a[1] == "hello from upstream" and b[1] == "hello from upstream"
    # the log names the route and the upstream that answered (rows are
    # written after the answer went out, off the serving path: wait)
    live = log_rows_until(srv, lambda x: x["route"] == "r-up", 2)
    assert len(live) == 2, live
    assert all(x["upstream"] == "up-ok" and x["escalations"] == 0 and
               x["shadow_of"] is None for x in live), live
    # (a relayed answer keeps the upstream's id; the row has tern's)
    for r in wait_rows(srv, "r-up", 2):
        assert r["outcome"] == "ok" and r["model"] == "up-ok", r
        assert r["live_output"] == "hello from upstream"
        assert r["exact"] == 0 and 0 <= r["overlap"] < 1


# ---- shadows that fail never touch the live answer

def test_failing_shadows_leave_live_answers_alone(srv):
    want = chat(srv, "smol")[1]
    t0 = time.time()
    with cf.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda m: (m, chat(srv, m)),
                            ["r-err", "r-stall", "r-dead"] * 2))
    took = time.time() - t0
    for m, (rid, text) in got:
        assert text == want, m
    # the stall's 2 s timeout is the shadow's, never the client's
    assert took < 20, took
    outcome = {"r-err": "error", "r-stall": "timeout", "r-dead": "error"}
    frag = {"r-err": "upstream exploded", "r-stall": "",
            "r-dead": "connect"}
    for src, oc in outcome.items():
        rows = wait_rows(srv, src, 2, timeout=60)
        for r in rows:
            assert r["outcome"] == oc, r
            assert r["exact"] is None and r["shadow_output"] is None
            assert r["error"], r
            assert frag[src] in r["error"] or frag[src] in json.dumps(r), r
        assert metric(srv, "tern_shadow_replays_total", source=src,
                      outcome=oc) >= 2
    assert requests.get(srv.base + "/health", timeout=T).status_code == 200


def test_shadow_killed_mid_replay(srv, doomed):
    """The shadow's server goes away while the replay waits on it: the
    replay ends as an error at once (not at its 120 s timeout); live
    answers before and after are untouched."""
    want = chat(srv, "smol")[1]
    rid, text = chat(srv, "r-doomed")
    assert text == want
    deadline = time.time() + 30
    while not doomed.calls and time.time() < deadline:
        time.sleep(0.05)
    assert doomed.calls, "the replay never reached the shadow"
    t0 = time.time()
    doomed.stop()
    rows = wait_rows(srv, "r-doomed", 1, timeout=30)
    assert time.time() - t0 < 30
    assert rows[0]["request_id"] == rid and rows[0]["outcome"] == "error"
    # and with the shadow gone for good
    rid2, text2 = chat(srv, "r-doomed")
    assert text2 == want
    rows = wait_rows(srv, "r-doomed", 2, timeout=30)
    assert {r["outcome"] for r in rows} == {"error"}


def test_full_queue_drops_and_counts(srv):
    """queue: 1 and a shadow that stalls: one replay runs, one waits, the
    rest are dropped and counted; every live answer is whole."""
    want = chat(srv, "smol")[1]
    before = metric(srv, "tern_shadow_replays_total", source="r-full",
                    outcome="dropped")
    for _ in range(6):
        assert chat(srv, "r-full")[1] == want
    dropped = metric(srv, "tern_shadow_replays_total", source="r-full",
                     outcome="dropped") - before
    assert dropped >= 3, dropped
    rows = wait_rows(srv, "r-full", 6 - int(dropped), timeout=60)
    assert {r["outcome"] for r in rows} == {"timeout"}


def test_share(srv):
    for _ in range(10):
        chat(srv, "r-none", max_tokens=2)
    n = 40
    for _ in range(n):
        chat(srv, "r-half", max_tokens=2)
    # every replay counted is also a row (the writer may lag the metric)
    deadline = time.time() + 60
    while time.time() < deadline:
        done = metric(srv, "tern_shadow_replays_total", source="r-half")
        if done and done == len(shadows(srv, source="r-half")):
            break
        time.sleep(0.3)
    rows = shadows(srv, source="r-half")
    # Binomial(40, 0.5): outside [8, 32] with probability < 1e-4
    assert 8 <= len(rows) <= 32, len(rows)
    assert shadows(srv, source="r-none") == []


def test_forged_shadow_header_is_ordinary_traffic(srv):
    """Without the server's secret the header means nothing: the request
    is live (logged without shadow_of, counted, shadowed as usual)."""
    rid, _ = chat(srv, "smol", headers={"X-Tern-Shadow": "guess",
                                        "X-Tern-Shadow-Of": "chatcmpl-x"},
                  max_tokens=3)
    row = log_rows_until(srv, lambda r: r["request_id"] == rid, 1)[0]
    assert row["shadow_of"] is None
    deadline = time.time() + 60
    while rid not in [r["request_id"] for r in shadows(srv, source="smol")]:
        assert time.time() < deadline, "the live request was not shadowed"
        time.sleep(0.2)


def test_api_shadows_arguments(srv):
    for q in ("limit=0", "limit=x", "before=-1", "since=never", "nope=1",
              "limit=1&limit=2"):
        r = requests.get(srv.base + "/api/shadows?" + q, timeout=T)
        assert r.status_code == 400, (q, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(srv.base + "/api/shadows?source=%27%20OR%201=1--",
                     timeout=T)
    assert r.status_code == 200 and r.json()["data"] == []


# ---- configs that are refused at start

BAD = [
    ("shadow: {target: nope}", "unknown target 'nope'"),
    ("shadow: {target: a}", "'a' is the name it shadows"),
    ("shadow: {target: b, share: 2}", "not a share in [0, 1]"),
    ("shadow: {share: 0.5}", "missing key 'target'"),
    ("shadow: {target: b, judge: nobody}", "unknown target 'nobody'"),
    ("shadow: {target: b, queue: 0}", "queue"),
    ("shadow: {target: b, colour: red}", "unknown key 'colour'"),
    ("shadow: b", "expected a mapping"),
]


@pytest.mark.parametrize("shadow,msg", BAD)
def test_bad_shadow_config(tern_bin, tmp_path, shadow, msg):
    smol = model_path("smollm2-135m")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"models:\n  - name: a\n    path: {smol}\n    {shadow}\n"
                   f"  - name: b\n    path: {smol}\n")
    r = subprocess.run([tern_bin, "serve", "--config", str(cfg), "--port",
                        "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr
    assert "models[0].shadow" in r.stderr, r.stderr

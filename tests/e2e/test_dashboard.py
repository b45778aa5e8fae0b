"""The live dashboard (GET /dashboard) and its JSON API (/api/stats,
/api/requests, /api/requests/ID), against a real server, real clients and
a real browser (Debian's chromium driven by Playwright).

What is checked:
- /api/stats totals equal what the clients were answered: requests,
  errors by type, prompt / cached / completion tokens, cost from the
  configured prices; latency quantiles lie within what was measured;
  series and gauges carry the load; grouping by model;
- bad arguments get a 400 naming them (unknown, repeated, bad window,
  bad limit, bad cursor), filters are data (injection finds nothing);
- the request table pages with its cursor and matches the log; one
  request's detail carries its text; no log: 404 request_log_disabled;
- the API key guards page and API, as Bearer or as Basic auth's password;
- in chromium under load: charts draw non-zero data, the table fills, the
  status filter works, the detail view opens, no console errors, and HTML
  or script sent through the prompt, the model name and errors runs
  nowhere (it shows as text). A screenshot is saved next to the binary.
"""
import base64
import concurrent.futures as cf
import json
import os
import pathlib
import shutil
import threading
import time

import pytest
import requests

from conftest import model_path, slow_mode

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PRICE_P, PRICE_C = 0.5, 2.0  # USD per million tokens
# no double quotes: the stored prompt is the request body, JSON-escaped
XSS = "<img src=x onerror=window.__pwned=1><script>window.__pwned=2</script>"


def chat(srv, body, headers=AUTH):
    return requests.post(srv.base + "/v1/chat/completions", json=body,
                         headers=headers, timeout=120)


def api(srv, path, headers=AUTH, **params):
    return requests.get(srv.base + path, params=params, headers=headers,
                        timeout=30)


def wait_for(pred, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    return pred()


@pytest.fixture
def dash(start_server, tmp_path):
    db = str(tmp_path / "log.db")
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--log-db", db, "--log-content", "--api-key", KEY,
                       "--price-prompt", str(PRICE_P),
                       "--price-completion", str(PRICE_C))
    srv.db = db
    return srv


def test_stats_equal_the_answers(dash):
    sent = []
    msgs = [{"role": "user", "content": "Name a fruit."}]
    for i in range(4):
        t0 = time.time()
        r = chat(dash, {"messages": msgs, "max_tokens": 5 + i,
                        "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200
        sent.append((r.json()["usage"], time.time() - t0))
    assert chat(dash, {"messages": []}).status_code == 400
    assert chat(dash, {"model": "nope", "messages": msgs}).status_code == 404
    assert chat(dash, {"messages": msgs}, headers={}).status_code == 401
    # the series end at the last whole second
    time.sleep(1.2)

    def totals():
        d = api(dash, "/api/stats", window="5m").json()
        return d if d["all"]["totals"]["requests"] >= 7 else None
    d = wait_for(totals)
    assert d, api(dash, "/api/stats", window="5m").text
    t = d["all"]["totals"]
    assert t["requests"] == 7
    assert t["errors"] == 3
    eb = t["errors_by_type"]
    assert eb["invalid_request"] == 1 and eb["not_found"] == 1 \
        and eb["auth"] == 1, eb
    pt = sum(u["prompt_tokens"] for u, _ in sent)
    ct = sum(u["completion_tokens"] for u, _ in sent)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u, _ in sent)
    assert (t["prompt_tokens"], t["completion_tokens"], t["cached_tokens"]) \
        == (pt, ct, cached)
    assert ct == 5 + 6 + 7 + 8
    assert t["cost"] == pytest.approx((pt * PRICE_P + ct * PRICE_C) / 1e6)
    assert t["prefix_hit_rate"] == pytest.approx(cached / pt, abs=1e-5)
    # quantiles within the measured range (histogram buckets: +-26%)
    slowest = max(s for _, s in sent) * 1000
    for h in ("ttft_ms", "itl_ms", "e2e_ms"):
        q = t[h]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"], (h, q)
    assert t["e2e_ms"]["p99"] <= slowest * 1.3, (t["e2e_ms"], slowest)
    assert t["ttft_ms"]["p99"] <= t["e2e_ms"]["p99"] * 1.3
    # series: 300 one-second points; what they carry adds up to the totals
    assert d["points"] == 300 and d["step_s"] == 1 and d["window_s"] == 300
    a = d["all"]
    assert len(a["requests_per_s"]) == 300
    assert round(sum(a["requests_per_s"])) == 7
    assert round(sum(a["completion_tokens_per_s"])) == ct
    assert sum(x for x in a["cost_per_min"]) / 60 == pytest.approx(t["cost"])
    assert any(x is not None for x in a["ttft_ms"]["p50"])
    # groups by model: the real one, and "" / "nope" for the refused ones
    keys = {g["key"]: g["totals"]["requests"] for g in d["groups"]}
    assert keys["SmolLM2-135M-Instruct.Q4_1"] == 4, keys
    assert keys.get("nope") == 1, keys
    # engine gauges are sampled every second
    def gauges():
        g = api(dash, "/api/stats", window="5m").json()["gauges"]
        return g if g and any(v is not None for v in g[0]["kv_used"]) else None
    g = wait_for(gauges)
    assert g and g[0]["model"] == "SmolLM2-135M-Instruct.Q4_1", g
    # the 1-hour window reads the minute ring; the same totals
    h = api(dash, "/api/stats", window="1h", by="none").json()
    assert h["step_s"] == 60 and h["all"]["totals"]["requests"] == 7
    assert [x["key"] for x in h["groups"]] == ["all"]


def test_bad_arguments_and_auth(dash):
    chat(dash, {"messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2})
    for path, params, name in [
            ("/api/stats", {"window": "10s"}, "window"),
            ("/api/stats", {"window": "25h"}, "window"),
            ("/api/stats", {"window": "soon"}, "window"),
            ("/api/stats", {"by": "color"}, "by"),
            ("/api/stats", {"limit": "5"}, "limit"),
            ("/api/requests", {"limit": "0"}, "limit"),
            ("/api/requests", {"limit": "501"}, "limit"),
            ("/api/requests", {"limit": "1e3"}, "limit"),
            ("/api/requests", {"before": "12"}, "before"),
            ("/api/requests", {"status": "2yy"}, "status"),
            ("/api/requests", {"since": "-1h"}, "since"),
            ("/api/requests", {"order": "ts; DROP TABLE requests"}, "order"),
            ("/api/requests", {"model": "m" * 300}, "model")]:
        r = api(dash, path, **params)
        assert r.status_code == 400, (path, params, r.text)
        e = r.json()["error"]
        assert e["param"] == name and e["type"] == "invalid_request_error", e
    r = requests.get(dash.base + "/api/requests?model=a&model=b",
                     headers=AUTH, timeout=30)
    assert r.status_code == 400 and "more than once" in r.text
    r = requests.get(dash.base + "/api/requests?" +
                     "&".join(f"k{i}=1" for i in range(40)),
                     headers=AUTH, timeout=30)
    assert r.status_code == 400
    assert api(dash, "/api/nothing").status_code == 404
    r = requests.post(dash.base + "/api/stats", headers=AUTH, timeout=30)
    assert r.status_code == 405
    # injection in filters is data: nothing matches, the table is intact
    for bad in ["' OR 1=1 --", "%", "*", "SmolLM2%"]:
        r = api(dash, "/api/requests", model=bad)
        assert r.status_code == 200 and r.json()["data"] == [], bad
    wait_for(lambda: api(dash, "/api/requests").json()["data"])
    assert len(api(dash, "/api/requests").json()["data"]) == 1
    # the key: Bearer or Basic (any user, the key as password); the page too
    for path in ("/dashboard", "/api/stats", "/api/requests"):
        r = requests.get(dash.base + path, timeout=30)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Basic "), r.headers
        assert KEY not in r.text
        r = requests.get(dash.base + path, auth=("x", "wrong"), timeout=30)
        assert r.status_code == 401
        r = requests.get(dash.base + path, auth=("admin", KEY), timeout=30)
        assert r.status_code == 200, (path, r.text)
    basic = base64.b64encode(f"u:{KEY}".encode()).decode()
    # Basic is for the dashboard: the OpenAI routes still want Bearer
    r = chat(dash, {"messages": [{"role": "user", "content": "hi"}]},
             headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 401
    page = api(dash, "/dashboard")
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "http://" not in page.text and "https://" not in page.text


def test_request_table_pages_and_details(dash):
    msgs = [{"role": "user", "content": "Count: " + XSS}]
    ids = []
    for i in range(5):
        r = chat(dash, {"messages": msgs, "max_tokens": 3})
        assert r.status_code == 200
        ids.append(r.json()["id"])
    chat(dash, {"messages": []})
    wait_for(lambda: len(api(dash, "/api/requests").json()["data"]) == 6)
    first = api(dash, "/api/requests", limit=4).json()
    assert len(first["data"]) == 4 and first["next"]
    rest = api(dash, "/api/requests", limit=4, before=first["next"]).json()
    assert len(rest["data"]) == 2 and rest["next"] is None
    rows = first["data"] + rest["data"]
    assert [r["request_id"] for r in rows if r["status"] == 200] == ids[::-1]
    assert all("prompt" not in r for r in rows)  # text only in the detail
    ok = api(dash, "/api/requests", status="2xx").json()["data"]
    assert len(ok) == 5
    bad = api(dash, "/api/requests", status="error").json()["data"]
    assert len(bad) == 1 and bad[0]["status"] == 400
    one = api(dash, "/api/requests/" + ids[2]).json()
    assert one["request_id"] == ids[2]
    # the body as sent
    assert json.loads(one["prompt"])["messages"] == msgs
    assert one["completion_tokens"] == 3 and one["cost"] > 0
    r = api(dash, "/api/requests/chatcmpl-nothere")
    assert r.status_code == 404 and r.json()["error"]["code"] == \
        "request_not_found"


def test_no_log_no_table(start_server):
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2")
    r = requests.get(srv.base + "/api/requests", timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "request_log_disabled"
    # the series need no log
    r = requests.post(srv.base + "/v1/completions",
                      json={"prompt": "a", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    time.sleep(1.2)
    d = requests.get(srv.base + "/api/stats?window=5m", timeout=30).json()
    assert d["all"]["totals"]["requests"] == 1
    assert d["all"]["totals"]["cost"] == 0  # no prices: nothing charged


def chromium_path():
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.mark.skipif(slow_mode(), reason="the browser run is the release "
                    "build's; the API above runs under ASan")
def test_dashboard_in_chromium(start_server, tmp_path, tern_bin):
    exe = chromium_path()
    if not exe:
        pytest.fail("chromium is missing: make deps installs it")
    from playwright.sync_api import sync_playwright
    # a model name that is markup: names may hold no whitespace, so this
    # one carries its payload without any
    evil = "<img/src=x/onerror=window.__pwned=3>"
    cfg = tmp_path / "models.yaml"
    cfg.write_text(
        "models:\n"
        f"  - name: '{evil}'\n"
        f"    path: {model_path('smollm2-135m')}\n"
        "    price_prompt: 0.5\n"
        "    price_completion: 2\n"
        "    shadow: {target: cand, queue: 16}\n"
        "  - name: cand\n"
        f"    path: {model_path('smollm2-135m')}\n")
    db = str(tmp_path / "log.db")
    srv = start_server("--config", str(cfg), "-t", "2", "--log-db", db,
                       "--log-content", "--api-key", KEY)
    stop = threading.Event()

    def load(i):
        n = 0
        while not stop.is_set():
            body = {"messages": [{"role": "user",
                                  "content": f"{XSS} tell me about {n}"}],
                    "max_tokens": 8}
            if n % 5 == 4:
                body = {"model": "<script>window.__pwned=4</script>",
                        "messages": body["messages"]}
            chat(srv, body)
            n += 1
    pool = cf.ThreadPoolExecutor(3)
    for i in range(3):
        pool.submit(load, i)
    console, page_errors = [], []
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=exe,
                                  args=["--no-sandbox", "--disable-gpu"])
            ctx = b.new_context(http_credentials={"username": "ops",
                                                  "password": KEY},
                                viewport={"width": 1400, "height": 1600})
            page = ctx.new_page()
            page.on("console", lambda m: console.append(m)
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: page_errors.append(e))
            page.goto(srv.base + "/dashboard")
            page.select_option("#window", "5m")
            # live: charts fill as the load runs
            page.wait_for_function(
                "() => ['req', 'tok', 'ttft', 'itl'].every(id =>"
                " Number(document.getElementById('c-' + id).dataset.nonzero"
                " || 0) > 0)", timeout=30000)
            page.wait_for_function(
                "() => document.querySelectorAll('#requests tbody tr')"
                ".length > 3", timeout=30000)
            assert int(page.get_attribute("#cards", "data-requests")) > 0
            # the model names show as text, in the legend and the table
            legend = page.inner_text("#l-req")
            assert evil in legend, legend
            page.wait_for_function(
                "s => document.querySelector('#requests').textContent"
                ".includes(s)", arg="<script>window.__pwned=4</script>",
                timeout=30000)
            # the status filter
            page.select_option("#f-status", "4xx")
            page.click("#f-apply")
            page.wait_for_function(
                "() => { const r = [...document.querySelectorAll("
                "'#requests tbody tr')]; return r.length > 0 && r.every("
                "x => x.children[1].textContent === '404'); }",
                timeout=30000)
            page.select_option("#f-status", "2xx")
            page.click("#f-apply")
            page.wait_for_function(
                "() => { const r = [...document.querySelectorAll("
                "'#requests tbody tr')]; return r.length > 0 && r.every("
                "x => x.children[1].textContent === '200'); }",
                timeout=30000)
            # the shadow panel: replays wait while the load runs, then
            # fill the comparison table and the agreement chart
            stop.set()
            pool.shutdown(wait=True)
            page.wait_for_function(
                "s => [...document.querySelectorAll('#shadow-table tbody tr')]"
                ".some(r => r.children[1].textContent === s &&"
                " r.children[4].textContent === 'ok')", arg=evil,
                timeout=60000)
            page.wait_for_function(
                "() => Number(document.getElementById('c-shadow').dataset"
                ".nonzero || 0) > 0", timeout=30000)
            assert "compared" in page.inner_text("#sh-note")
            page.uncheck("#live")
            # the detail view: the prompt as text
            page.click("#requests tbody tr >> nth=0")
            page.wait_for_selector("#detail pre", state="visible")
            body = page.inner_text("#d-text")
            assert XSS in body, body
            time.sleep(0.5)
            shot = pathlib.Path(tern_bin).parent / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            # nothing injected ran, and no markup came from the data
            assert page.evaluate("() => window.__pwned") is None
            assert page.evaluate(
                "() => document.querySelectorAll('main img, main script')"
                ".length") == 0
            b.close()
    finally:
        stop.set()
        pool.shutdown(wait=True)
    assert not page_errors, page_errors
    assert not [m.text for m in console], [m.text for m in console]
    assert os.path.getsize(shot) > 10000
    # and the JSON says the same as the page did: those requests, that model
    d = json.loads(requests.get(srv.base + "/api/stats?window=5m",
                                headers=AUTH, timeout=30).text)
    assert evil in [g["key"] for g in d["groups"]]


def test_history_survives_a_restart(start_server, tmp_path):
    """The charts of a restarted server start from the log's last 24 h."""
    db = str(tmp_path / "log.db")
    args = ["-m", model_path("smollm2-135m"), "-t", "2", "--log-db", db,
            "--price-prompt", "1", "--price-completion", "3"]
    srv = start_server(*args)
    usage = []
    for i in range(3):
        r = requests.post(srv.base + "/v1/completions",
                          json={"prompt": f"{i} a", "max_tokens": 4,
                                "ignore_eos": True}, timeout=60)
        usage.append(r.json()["usage"])
    requests.post(srv.base + "/v1/completions", json={"prompt": ""},
                  timeout=60)
    assert srv.stop() == 0
    srv = start_server(*args)

    def totals():
        t = requests.get(srv.base + "/api/stats?window=1h",
                         timeout=30).json()["all"]["totals"]
        return t if t["requests"] >= 4 else None
    t = wait_for(totals)
    assert t, requests.get(srv.base + "/api/stats?window=1h", timeout=30).text
    assert t["requests"] == 4 and t["errors"] == 1
    assert t["completion_tokens"] == sum(u["completion_tokens"] for u in usage)
    assert t["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert t["cost"] == pytest.approx(
        sum(u["prompt_tokens"] * 1 + u["completion_tokens"] * 3
            for u in usage) / 1e6)
    assert t["itl_ms"]["p50"] is not None and t["ttft_ms"]["p50"] is not None

"""Tenants through a real `tern serve --config`: keys, allowed names, rate
limits and daily budgets, under 16 concurrent clients."""
import concurrent.futures as cf
import os
import pathlib

import pytest
import requests

from conftest import model_path

KEYS = {"alpha": "key-alpha-0001", "beta": "key-beta-00002",
        "gamma": "key-gamma-0003", "delta": "key-delta-0004",
        "eps": "key-eps-000005"}


@pytest.fixture(scope="module")
def srv(tern_bin, tmp_path_factory):
    from conftest import TernServer
    d = tmp_path_factory.mktemp("tenants")
    cfg = d / "cfg.yaml"
    os.environ["TN_E2E_DELTA_KEY"] = KEYS["delta"]
    cfg.write_text(f"""
api_key: admin-key-0000
models:
  - name: smollm2
    path: {model_path("smollm2-135m")}
    price_prompt: 1000
    price_completion: 1000
  - name: smollc
    path: {model_path("smollm2-135m")}
    price_compute: 3600
routes:
  - name: auto
    strategy: rules
    rules:
      - {{tenant: [beta], to: smollm2}}
      - {{to: smollm2}}
tenants:
  - {{name: alpha, key: {KEYS["alpha"]}, rpm: 5}}
  - {{name: beta, key: {KEYS["beta"]}, allow: [auto]}}
  - {{name: gamma, key: {KEYS["gamma"]}, budget_per_day: 0.5}}
  - {{name: delta, key_env: TN_E2E_DELTA_KEY, tpm: 400}}
  - {{name: eps, key: {KEYS["eps"]}, allow: [smollc], budget_per_day: 0.5}}
""")
    s = TernServer(tern_bin, ["--config", str(cfg), "-t", "2",
                              "--log-db", str(d / "log.db")],
                   str(d / "serve.log"))
    yield s
    assert s.stop() == 0, s.read_log()[-3000:]


def post(srv, key, model="smollm2", max_tokens=2, **kw):
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}], **kw}
    return requests.post(srv.base + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"},
                         timeout=60)


def burst(srv, key, n=16, **kw):
    with cf.ThreadPoolExecutor(16) as ex:
        return list(ex.map(lambda _: post(srv, key, **kw), range(n)))


def test_keys(srv):
    assert post(srv, "admin-key-0000").status_code == 200
    r = post(srv, "nope-nope-nope")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert post(srv, KEYS["delta"]).status_code == 200  # key from the env
    # a tenant's key cannot load adapters
    r = requests.post(srv.base + "/v1/load_lora_adapter",
                      headers={"Authorization": f"Bearer {KEYS['beta']}"},
                      json={"lora_name": "x", "lora_path": "y"}, timeout=10)
    assert r.status_code == 403


def test_allow(srv):
    r = post(srv, KEYS["beta"], model="smollm2")
    assert r.status_code == 403
    e = r.json()["error"]
    assert e["code"] == "model_not_allowed" and "beta" in e["message"]
    r = post(srv, KEYS["beta"], model="auto")
    assert r.status_code == 200
    assert r.headers["x-tern-route"] == "auto"
    ids = [m["id"] for m in requests.get(
        srv.base + "/v1/models", timeout=10,
        headers={"Authorization": f"Bearer {KEYS['beta']}"}).json()["data"]]
    assert ids == ["auto"]


def test_rpm_under_16_clients(srv):
    rs = burst(srv, KEYS["alpha"])
    ok = [r for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(ok) == 5 and len(limited) == 11, [r.status_code for r in rs]
    e = limited[0].json()["error"]
    assert e["code"] == "rate_limit_exceeded" and "alpha" in e["message"]
    assert 1 <= int(limited[0].headers["Retry-After"]) <= 60


def test_budget_under_16_clients(srv):
    # each request costs about (30 prompt + 2 completion) * 1000 / 1e6 =
    # 0.032 USD; the budget (0.5) admits at most what fits plus one
    # request's worth, however many clients race for it
    admitted = 0
    for _ in range(4):
        rs = burst(srv, KEYS["gamma"])
        admitted += sum(r.status_code == 200 for r in rs)
        if any(r.status_code == 429 for r in rs):
            break
    over = [r for r in rs if r.status_code == 429]
    assert over, "the budget never ran out"
    e = over[0].json()["error"]
    assert e["code"] == "insufficient_quota" and "gamma" in e["message"]
    assert int(over[0].headers["Retry-After"]) >= 1
    cost = requests.post(srv.base + "/v1/chat/completions", timeout=60,
                         headers={"Authorization": "Bearer admin-key-0000"},
                         json={"model": "smollm2", "max_tokens": 2,
                               "temperature": 0, "messages": [
                                   {"role": "user", "content": "Hi"}]}
                         ).json()["usage"]["cost"]
    spent = admitted * cost
    assert spent <= 0.5 + cost + 1e-9, (admitted, cost)
    assert spent >= 0.5 - 2 * cost, (admitted, cost)


def test_tpm_under_16_clients(srv):
    # 400 tokens a minute; one request is ~32 tokens used, estimated from
    # its body and max_tokens: the burst admits about what fits
    rs = burst(srv, KEYS["delta"])
    ok = sum(r.status_code == 200 for r in rs)
    assert 1 <= ok <= 13, [r.status_code for r in rs]
    assert any(r.status_code == 429 and
               r.json()["error"]["code"] == "rate_limit_exceeded"
               for r in rs)


def test_metrics_and_log(srv):
    text = requests.get(srv.base + "/metrics", timeout=10).text
    assert 'tern_tenant_requests_total{tenant="alpha",status="429"}' in text
    assert 'tern_tenant_rejections_total{tenant="gamma",reason="budget"}' in text
    assert 'tern_tenant_cost_usd_total{tenant="gamma"}' in text
    assert 'tern_tenant_tokens_total{tenant="beta",kind="prompt"}' in text
    r = requests.get(srv.base + "/api/requests?tenant=beta", timeout=10,
                     headers={"Authorization": "Bearer admin-key-0000"})
    assert r.status_code == 200
    rows = r.json()["rows"] if "rows" in r.json() else r.json()["data"]
    assert rows and all(x["tenant"] == "beta" for x in rows)


def test_bad_tenant_config(run_tern, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"models:\n  - {{name: m, path: {model_path('smollm2-135m')}}}\n"
                   "tenants:\n  - {name: a, key_env: TN_E2E_NOT_SET_ANYWHERE}\n")
    r = run_tern("serve", "--config", str(cfg), timeout=30)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "TN_E2E_NOT_SET_ANYWHERE is not set" in err
    assert len(err.strip().splitlines()) == 1, err


def test_budget_priced_by_compute(srv):
    """A model priced by compute time (3600 USD an hour: a second costs one
    USD): the budget holds under 16 clients too, the reservation counting
    tokens at the calibrated step model (an upper bound), the bill the
    measured share."""
    import sqlite3
    for _ in range(8):
        rs = burst(srv, KEYS["eps"], model="smollc", max_tokens=8)
        if any(r.status_code == 429 for r in rs):
            break
    assert any(r.status_code == 429 for r in rs), "the budget never ran out"
    ok = [r.json()["usage"]["cost"] for r in rs if r.status_code == 200]
    assert all(c > 0 for c in ok)
    db = pathlib.Path(srv.log_path).parent / "log.db"
    deadline = __import__("time").time() + 10
    while True:
        con = sqlite3.connect(str(db))
        spent, most, n = con.execute(
            "SELECT SUM(cost), MAX(cost), COUNT(*) FROM requests WHERE "
            "tenant = 'eps' AND status = 200").fetchone()
        con.close()
        if n >= len(ok) or __import__("time").time() > deadline:
            break
    assert spent and spent <= 0.5 + most + 1e-9, (spent, most)

"""A real Prometheus (Debian's `prometheus`) scrapes `tern serve` once a
second while a load generator drives it; PromQL over the scraped data must
agree with what the load generator measured:

- the generation token counter equals the completion tokens the clients
  were answered, and the request counter the requests;
- the token rate over the steady middle of the load equals tokens / wall
  time of the load (within Prometheus' window extrapolation);
- the TTFT median from histogram_quantile lies in the histogram bucket of
  the clients' median TTFT, or a neighbouring one (the server starts its
  clock when the request reaches the engine, the client when it sends).
"""
import concurrent.futures as cf
import json
import shutil
import subprocess
import threading
import time

import pytest
import requests

from conftest import free_port, model_path, slow_mode

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]

pytestmark = pytest.mark.skipif(
    slow_mode(), reason="numbers, not memory safety: the release run's job")


def promql(base, q, at=None):
    params = {"query": q}
    if at is not None:
        params["time"] = f"{at:.3f}"
    r = requests.get(base + "/api/v1/query", params=params, timeout=10)
    r.raise_for_status()
    d = r.json()
    assert d["status"] == "success", d
    return d["data"]["result"]


def scalar(base, q, at=None):
    res = promql(base, q, at)
    assert len(res) == 1, (q, res)
    return float(res[0]["value"][1])


@pytest.fixture
def prometheus(tmp_path):
    exe = shutil.which("prometheus")
    if not exe:
        pytest.fail("prometheus is missing: make deps installs it")
    procs = []

    def start(target_port):
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: tern\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n")
        log = open(tmp_path / "prometheus.log", "wb")
        p = subprocess.Popen(
            [exe, f"--config.file={cfg}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        procs.append((p, log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if promql(base, 'up{job="tern"} == 1'):
                    return base
            except requests.RequestException:
                pass
            if p.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError("prometheus did not scrape tern: " +
                           (tmp_path / "prometheus.log").read_text()[-2000:])
    yield start
    for p, log in procs:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()


def stream(base, i):
    t0 = time.perf_counter()
    ttft = None
    usage = None
    with requests.post(base + "/v1/completions", stream=True, timeout=300,
                       json={"prompt": f"Request {i}. The weather today is",
                             "max_tokens": 24, "ignore_eos": True,
                             "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            if ttft is None and ev["choices"] and ev["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            usage = ev.get("usage") or usage
    return ttft, usage["completion_tokens"]


def bucket_of(v):
    for i, b in enumerate(TTFT_BUCKETS):
        if v <= b:
            return i
    return len(TTFT_BUCKETS)


def test_promql_agrees_with_the_load(start_server, prometheus):
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2")
    prom = prometheus(srv.port)
    # a closed loop of 4 clients for 8 s: long enough for several scrapes
    # and a steady middle, however fast this machine is
    t_start = time.time()
    stop_at = t_start + 8
    lock = threading.Lock()
    got, counter = [], [0]

    def client():
        while time.time() < stop_at:
            with lock:
                i = counter[0]
                counter[0] += 1
            r = stream(srv.base, i)
            with lock:
                got.append(r)
    with cf.ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(client) for _ in range(4)]:
            f.result()
    t_end = time.time()
    n_req = len(got)
    tokens = sum(n for _, n in got)
    assert tokens == 24 * n_req
    # two scrapes after the last request
    time.sleep(2.5)
    q_tok = 'sum(tern_generation_tokens_total{job="tern"})'
    assert scalar(prom, q_tok) == tokens
    assert scalar(prom, 'sum(tern_request_success_total{job="tern"})') == n_req
    # the counter's increase over the load, read at both ends: exact
    before = promql(prom, q_tok, at=t_start - 0.5)
    assert not before or float(before[0]["value"][1]) == 0
    # rate() over the steady middle of the load (closed loop: no ramp
    # inside it) against the clients' tokens over their wall time
    dur = t_end - t_start
    win = int(dur - 3)
    rate = scalar(prom, f"sum(rate(tern_generation_tokens_total[{win}s]))",
                  at=t_end - 1)
    client_rate = tokens / dur
    print(f"tokens/s: client {client_rate:.1f}, PromQL rate over {win} s "
          f"{rate:.1f}")
    assert 0.75 * client_rate <= rate <= 1.25 * client_rate, \
        (rate, client_rate)
    # the TTFT median
    ttfts = sorted(t for t, _ in got)
    client_p50 = ttfts[len(ttfts) // 2]
    p50 = scalar(prom, "histogram_quantile(0.5, sum by (le) "
                 "(tern_time_to_first_token_seconds_bucket))")
    print(f"TTFT p50: client {client_p50 * 1000:.1f} ms, "
          f"histogram_quantile {p50 * 1000:.1f} ms")
    assert abs(bucket_of(p50) - bucket_of(client_p50)) <= 1, (p50, client_p50)
    assert p50 <= client_p50 * 1.5

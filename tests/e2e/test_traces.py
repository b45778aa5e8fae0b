"""Traces (tern serve --otlp-endpoint) into a real OTLP receiver: MLflow's
tracking server (from PyPI), read back through MLflow's own client.

What is checked:
- a client's W3C traceparent is honoured: same trace id, the client's span
  as the root's parent; without one, a new trace whose root has none; a
  traceparent whose sampled flag is off exports nothing; a malformed one
  is ignored (a new trace);
- the spans: the HTTP request as root (status code, model, usage equal to
  the response's), and under it receive, queue, one span per prompt chunk
  (their tokens add up to the uncached prompt), decode and response, all
  inside the root's time;
- a refused request's root span has status ERROR with the message sent;
- an endpoint that is down costs the requests nothing: they are answered,
  and the spans are counted as dropped.
"""
import time

import pytest
import requests

from conftest import free_port, model_path, slow_mode


def get_trace(trace_hex, timeout=20):
    import mlflow
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            t = mlflow.get_trace(f"tr-{trace_hex}")
        except Exception:  # not there yet
            t = None
        if t is not None and t.data.spans:
            return t
        time.sleep(0.5)
    return None


def by_name(trace):
    out = {}
    for s in trace.data.spans:
        out.setdefault(s.name, []).append(s)
    return out


@pytest.mark.skipif(slow_mode(), reason="under ASan the spans are built "
                    "and dropped (test_endpoint_down_costs_nothing): MLflow "
                    "adds no memory checks")
def test_spans_and_traceparent(start_server, mlflow_server):
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--step-tokens", "32", "--otlp-endpoint",
                       mlflow_server + "/v1/traces", "--otlp-header",
                       "x-mlflow-experiment-id: 0", "--otlp-service",
                       "tern-test")
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    body = {"messages": [{"role": "user", "content":
                          "Tell me about rivers. " * 12}],
            "max_tokens": 6, "ignore_eos": True}
    r = requests.post(srv.base + "/v1/chat/completions", json=body,
                      headers={"traceparent": f"00-{tid}-{parent}-01"},
                      timeout=60)
    assert r.status_code == 200
    usage = r.json()["usage"]
    t = get_trace(tid)
    assert t is not None, "the trace did not reach MLflow"
    spans = by_name(t)
    root = spans["POST /v1/chat/completions"][0]
    assert root.parent_id == parent
    assert root.trace_id == f"tr-{tid}"
    a = root.attributes
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.request.model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert a["gen_ai.response.id"] == r.json()["id"]
    assert a["gen_ai.response.finish_reasons"] == "length"
    for name in ("receive", "queue", "prefill chunk", "decode", "response"):
        assert name in spans, (name, list(spans))
    chunks = spans["prefill chunk"]
    # 32-token steps: the prompt runs in several chunks
    assert len(chunks) >= 2
    assert sum(c.attributes["tern.prompt_tokens"] for c in chunks) == \
        usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    slack = 2_000_000  # ns: clocks converted from monotonic once
    for s in t.data.spans:
        if s is root:
            continue
        assert s.parent_id == root.span_id, s.name
        assert root.start_time_ns - slack <= s.start_time_ns <= \
            s.end_time_ns <= root.end_time_ns + slack, s.name
    starts = sorted(c.start_time_ns for c in chunks)
    assert starts == [c.start_time_ns for c in chunks]  # in order
    assert spans["decode"][0].start_time_ns >= chunks[-1].start_time_ns

    # without traceparent: a new trace, its root without a parent
    r = requests.post(srv.base + "/v1/completions",
                      json={"prompt": "Once", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    # not sampled by the client: nothing exported
    off = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    r = requests.post(srv.base + "/v1/completions",
                      json={"prompt": "Once", "max_tokens": 2},
                      headers={"traceparent": f"00-{off}-{parent}-00"},
                      timeout=60)
    assert r.status_code == 200
    # malformed: ignored, a new trace
    bad = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
    r = requests.post(srv.base + "/v1/completions",
                      json={"prompt": "Once", "max_tokens": 2},
                      headers={"traceparent": f"00-{bad}-{parent}-1"},
                      timeout=60)
    assert r.status_code == 200
    # refused: the root span says why
    err = "cccccccccccccccccccccccccccccccc"
    r = requests.post(srv.base + "/v1/chat/completions",
                      json={"messages": []},
                      headers={"traceparent": f"00-{err}-{parent}-01"},
                      timeout=60)
    assert r.status_code == 400
    te = get_trace(err)
    assert te is not None
    root = te.data.spans[0]
    assert root.status.status_code.name == "ERROR"
    assert "messages" in root.status.description
    assert root.attributes["http.response.status_code"] == 400
    assert get_trace(off, timeout=3) is None
    assert get_trace(bad, timeout=1) is None
    import mlflow
    roots = [t for t in mlflow.search_traces(locations=["0"],
                                             return_type="list")
             if any(s.name == "POST /v1/completions" and s.parent_id is None
                    for s in t.data.spans)]
    assert len(roots) >= 2  # the plain one and the malformed one


def test_endpoint_down_costs_nothing(start_server):
    dead = free_port()
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--otlp-endpoint", f"http://127.0.0.1:{dead}/v1/traces")
    t0 = time.time()
    for i in range(3):
        r = requests.post(srv.base + "/v1/completions",
                          json={"prompt": f"{i}", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    assert time.time() - t0 < 30

    def dropped():
        m = requests.get(srv.base + "/metrics", timeout=10).text
        for line in m.splitlines():
            if line.startswith("tern_otlp_spans_dropped_total "):
                return float(line.split()[1])
        return 0
    deadline = time.time() + 15
    while dropped() == 0 and time.time() < deadline:
        time.sleep(0.3)
    assert dropped() > 0


def test_bad_otlp_options(run_tern):
    m = model_path("smollm2-135m")
    r = run_tern("serve", "-m", m, "--otlp-endpoint", "ftp://x/v1/traces",
                 timeout=60)
    assert r.returncode == 1 and b"--otlp-endpoint" in r.stderr
    r = run_tern("serve", "-m", m, "--otlp-endpoint", "http://x/v1/traces",
                 "--otlp-header", "no colon", timeout=60)
    assert r.returncode == 1 and b"--otlp-header 'no colon'" in r.stderr
    r = run_tern("serve", "-m", m, "--otlp-header", "a: b", timeout=60)
    assert r.returncode == 1 and b"--otlp-endpoint" in r.stderr

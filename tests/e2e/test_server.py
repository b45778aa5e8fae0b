"""`tern serve` against SmolLM2-135M with the real `openai` client.

Functional behaviour only (bad input lives in its own file): chat and
completions, streaming, stop strings, n, seeds, logprobs, usage, multi-turn
prefix reuse, batching/preemption/prefix-cache invariance, metrics, API key,
multi-model config, SIGTERM drain and client disconnects.
"""
import concurrent.futures as cf
import http.client
import json
import signal
import time
import uuid

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import model_path, slow_mode

SMOL = "smollm2-135m"


# ---- helpers

@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def name(client):
    """The model name the shared server answers to."""
    return client.models.list().data[0].id


def tokenize(run_tern, text, model=SMOL):
    r = run_tern("tokenize", "-m", model_path(model), stdin=text.encode())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def chatml(messages):
    """SmolLM2's chat template (ChatML), with the generation prompt."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                  for m in messages)
    return out + "<|im_start|>assistant\n"


def metrics(srv):
    """{(sample name, ((label, value), ...)): value} and {family: type}."""
    r = requests.get(srv.base + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    samples, types = {}, {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def metric(srv, sample, **labels):
    samples, _ = metrics(srv)
    return samples.get((sample, tuple(sorted(labels.items()))))


def poll_metric(srv, sample, want, timeout=5.0, **labels):
    deadline = time.time() + timeout
    while True:
        v = metric(srv, sample, **labels)
        if v == want or time.time() > deadline:
            return v
        time.sleep(0.05)


def sse_events(resp):
    """The `data:` payloads of a raw SSE response (requests, stream=True)."""
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            yield line[6:].decode()


def usage_tuple(u):
    return (u.prompt_tokens, u.completion_tokens, u.total_tokens)


def chat(client, model, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw)


# ---- endpoints

def test_health_ready_models(server, client):
    assert requests.get(server.base + "/health", timeout=5).status_code == 200
    assert requests.get(server.base + "/ready", timeout=5).status_code == 200
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].object == "model"
    assert models[0].id == "SmolLM2-135M-Instruct.Q4_1"


# ---- completions and chat, non-streaming, exact usage

def test_completion_usage_exact(client, name, run_tern):
    prompt = "The capital of France is"
    r = client.completions.create(model=name, prompt=prompt, max_tokens=8,
                                  temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.model == name
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.text.strip()
    assert "Paris" in c.text
    assert c.finish_reason == "length"
    ids = tokenize(run_tern, prompt)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(ids) + 8
    assert len(c.logprobs.tokens) == 8
    assert "".join(c.logprobs.tokens) == c.text


def test_completion_prompt_forms(client, name, run_tern):
    """A prompt as text, as token ids and in a list give the same answers."""
    p1, p2 = "The capital of France is", "One, two, three,"
    kw = dict(model=name, max_tokens=8, temperature=0)
    a = client.completions.create(prompt=p1, **kw)
    b = client.completions.create(prompt=p2, **kw)
    ids = tokenize(run_tern, p1)
    t = client.completions.create(prompt=ids, **kw)
    assert t.choices[0].text == a.choices[0].text
    assert t.usage.prompt_tokens == a.usage.prompt_tokens == len(ids)
    both = client.completions.create(prompt=[p1, p2], **kw)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == a.choices[0].text
    assert both.choices[1].text == b.choices[0].text
    assert both.usage.prompt_tokens == (a.usage.prompt_tokens
                                        + b.usage.prompt_tokens)
    assert both.usage.completion_tokens == (a.usage.completion_tokens
                                            + b.usage.completion_tokens)


def test_chat_usage_exact(client, name, run_tern):
    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=name, messages=msgs,
                                       max_tokens=48, temperature=0,
                                       logprobs=True)
    assert r.object == "chat.completion"
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    ids = tokenize(run_tern, chatml(msgs))
    assert r.usage.prompt_tokens == len(ids)
    # every generated token (the end-of-turn token included) is counted
    assert r.usage.completion_tokens == len(c.logprobs.content)
    assert 1 <= r.usage.completion_tokens <= 48
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 48
    assert r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    # the chat endpoint is the completions endpoint on the templated prompt
    t = client.completions.create(model=name, prompt=chatml(msgs),
                                  max_tokens=48, temperature=0)
    assert t.usage.prompt_tokens == len(ids)
    assert t.choices[0].text == c.message.content
    assert t.choices[0].finish_reason == c.finish_reason


def test_chat_max_tokens_length(client, name):
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = chat(client, name, "Tell me a long story about a dragon.", **kw)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5
        assert r.choices[0].message.content


def test_chat_finishes_with_stop(client, name):
    r = chat(client, name, "Hi", max_tokens=64)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 64
    assert "<|im_end|>" not in r.choices[0].message.content


# ---- streaming equals non-streaming

def test_stream_equals_nonstream_chat(client, name):
    kw = dict(model=name, temperature=0, max_tokens=32,
              messages=[{"role": "user",
                         "content": "Name three colors of the rainbow."}])
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or ""
                   for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks
              if ch.choices and ch.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    # usage only in the last chunk, which has no choices
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == []
    assert usage_tuple(chunks[-1].usage) == usage_tuple(full.usage)
    assert len({ch.id for ch in chunks}) == 1
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_stream_equals_nonstream_completions(client, name):
    kw = dict(model=name, temperature=0, max_tokens=32,
              prompt="A list of fruits: apple, banana,")
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks
              if ch.choices and ch.choices[0].finish_reason]
    assert text == full.choices[0].text
    assert finish == [full.choices[0].finish_reason]
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == []
    assert usage_tuple(chunks[-1].usage) == usage_tuple(full.usage)


def test_stream_raw_sse_ends_with_done(server, name):
    r = requests.post(server.base + "/v1/completions", stream=True, timeout=60,
                      json={"model": name, "prompt": "Hello", "stream": True,
                            "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    for e in events[:-1]:
        json.loads(e)


# ---- stop strings

def test_stop_strings_completions(client, name):
    kw = dict(model=name, temperature=0, max_tokens=24,
              prompt="The capital of France is", extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert "." in full[1:]
    cut = full[:full.index(".")]
    r = client.completions.create(stop=".", **kw)
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    # a list: the earliest match wins; strings that never occur do nothing
    words = full.split()
    assert len(words) >= 3
    stop2 = words[2]
    cut2 = full[:full.index(stop2)]
    r = client.completions.create(stop=["@@never@@", stop2], **kw)
    assert r.choices[0].text == cut2
    assert r.choices[0].finish_reason == "stop"
    # streaming never leaks the stop string
    chunks = list(client.completions.create(stream=True, stop=[stop2], **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut2
    # a stop string that never occurs: length
    r = client.completions.create(stop=["@@never@@"], **kw)
    assert r.choices[0].text == full
    assert r.choices[0].finish_reason == "length"


def test_stop_strings_chat(client, name):
    q = "Write a sentence about the weather today."
    kw = dict(max_tokens=24, extra_body={"ignore_eos": True})
    full = chat(client, name, q, **kw).choices[0].message.content
    words = full.split()
    assert len(words) >= 4
    for stop in (words[3], [words[3], "@@never@@"]):
        r = chat(client, name, q, stop=stop, **kw)
        assert r.choices[0].message.content == full[:full.index(words[3])]
        assert r.choices[0].finish_reason == "stop"


# ---- n > 1 and seeds

def test_n_samples_seeded(client, name):
    kw = dict(model=name, prompt="Once upon a time", max_tokens=12, n=4,
              temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in a.choices)
    assert a.usage.completion_tokens == 4 * 12
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    # the samples are not copies of each other
    assert len({c.text for c in a.choices}) > 1
    one = client.completions.create(**{**kw, "n": 1})
    assert a.usage.prompt_tokens == one.usage.prompt_tokens


def test_n_samples_chat(client, name):
    kw = dict(model=name, max_tokens=10, n=3, temperature=0.9, seed=99,
              messages=[{"role": "user", "content": "Say something nice."}])
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == \
        [c.message.content for c in b.choices]


def test_n_greedy_all_equal(client, name):
    kw = dict(model=name, prompt="The three primary colors are",
              max_tokens=16, temperature=0)
    one = client.completions.create(**kw).choices[0]
    many = client.completions.create(n=3, **kw).choices
    assert [c.index for c in many] == [0, 1, 2]
    for c in many:
        assert c.text == one.text
        assert c.finish_reason == one.finish_reason
    chunks = list(client.completions.create(n=3, stream=True, **kw))
    for i in range(3):
        assert "".join(ch.choices[0].text for ch in chunks
                       if ch.choices and ch.choices[0].index == i) == one.text


def test_seed_reproducible(client, name):
    def gen(seed):
        return chat(client, name, "Write a sentence about the sea.",
                    temperature=1.0, seed=seed,
                    max_tokens=16).choices[0].message.content
    a, b = gen(7), gen(7)
    assert a == b
    assert any(gen(s) != a for s in (1, 2, 3, 4))


# ---- logprobs

def check_top(entry, k):
    tops = entry.top_logprobs
    assert len(tops) == k
    lps = [t.logprob for t in tops]
    assert lps == sorted(lps, reverse=True)
    assert all(lp <= 0 for lp in lps)
    assert entry.logprob <= 0
    assert entry.logprob <= lps[0] + 1e-5
    assert entry.bytes is not None


def test_logprobs_chat(client, name):
    r = chat(client, name, "Describe a cat.", temperature=1.0, seed=5,
             max_tokens=12, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        check_top(e, 5)
    assert "".join(e.token for e in content
                   if e.token != "<|im_end|>") == r.choices[0].message.content
    # greedy: the chosen token is the top-1
    g = chat(client, name, "Describe a cat.", max_tokens=12, logprobs=True,
             top_logprobs=3)
    for e in g.choices[0].logprobs.content:
        check_top(e, 3)
        assert e.token == e.top_logprobs[0].token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)
    # logprobs without top_logprobs: no alternatives
    n = chat(client, name, "Describe a cat.", max_tokens=4, logprobs=True)
    for e in n.choices[0].logprobs.content:
        assert e.top_logprobs == []
    # and none when not asked for
    assert chat(client, name, "Hi", max_tokens=2).choices[0].logprobs is None


def test_logprobs_completions(client, name):
    r = client.completions.create(model=name, prompt="The capital of France is",
                                  max_tokens=10, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) \
        == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset[0] == 0
    off = 0
    for tok, tlp, top, o in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                lp.text_offset):
        assert o == off
        off += len(tok)
        assert 1 <= len(top) <= 3
        assert all(v <= 0 for v in top.values())
        assert tlp <= 0
        # greedy: the chosen token is the most likely one
        assert tlp == pytest.approx(max(top.values()), abs=1e-6)
        assert top.get(tok) == pytest.approx(tlp, abs=1e-6)


def test_logprobs_stream_equals_nonstream(client, name):
    kw = dict(model=name, temperature=0, max_tokens=8, logprobs=True,
              top_logprobs=2,
              messages=[{"role": "user", "content": "What is 2+2?"}])
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == \
        [(e.token, round(e.logprob, 5)) for e in full]


# ---- multi-turn chat and prefix reuse

def test_multi_turn_chat_reuses_prefix(server, client, name):
    hits0 = metric(server, "tern_prefix_cache_hits_total", model=name)
    # a fresh system prompt, so the first turn can't hit the cache
    msgs = [{"role": "system",
             "content": f"Session {uuid.uuid4().hex}. You are a helpful "
                        "assistant who answers in one short sentence."}]
    prev_prompt = None
    for turn, q in enumerate(["What is the capital of France?",
                              "And what river flows through it?",
                              "Name one famous museum there."]):
        msgs.append({"role": "user", "content": q})
        r = client.chat.completions.create(model=name, messages=msgs,
                                           max_tokens=24, temperature=0)
        answer = r.choices[0].message.content
        assert answer.strip()
        u = r.usage
        cached = u.prompt_tokens_details.cached_tokens
        assert 0 <= cached <= u.prompt_tokens
        if turn == 0:
            assert cached == 0
        else:
            assert u.prompt_tokens > prev_prompt
            # at least the previous turn's full prompt blocks are reused
            assert cached >= (prev_prompt - 1) // 16 * 16 > 0
        prev_prompt = u.prompt_tokens
        msgs.append({"role": "assistant", "content": answer})
    hits1 = metric(server, "tern_prefix_cache_hits_total", model=name)
    assert hits1 > hits0


# ---- batching changes nothing

# under the sanitizers (TERN_SLOW=1): 8 requests of 16 tokens
N_CONC = 8 if slow_mode() else 16
CONC_TOKENS = 16 if slow_mode() else 48


def conc_prompts():
    topics = ["bridges", "volcanoes", "bees", "clocks", "glaciers", "kites",
              "lighthouses", "owls", "pianos", "deserts", "comets", "maps",
              "tea", "trains", "coral reefs", "windmills"]
    return [f"Write a short paragraph about {t}. Mention where they are "
            f"found, how people use them, and one surprising fact about "
            f"{t} that most people do not know." for t in topics[:N_CONC]]


def run_chat(client, model, q, max_tokens=CONC_TOKENS, system=None):
    msgs = [{"role": "user", "content": q}]
    if system is not None:
        msgs.insert(0, {"role": "system", "content": system})
    r = client.chat.completions.create(model=model, messages=msgs,
                                       temperature=0, max_tokens=max_tokens,
                                       extra_body={"ignore_eos": True})
    return r.choices[0].message.content, r.usage


def run_concurrent(client, model, prompts, **kw):
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(lambda q: run_chat(client, model, q, **kw),
                           prompts))


@pytest.fixture(scope="module")
def alone(client, name):
    """Each prompt's greedy answer, one request at a time."""
    return [run_chat(client, name, q)[0] for q in conc_prompts()]


def test_concurrent_equals_alone(server, client, name, alone):
    prompts = conc_prompts()
    assert len(prompts) == N_CONC
    res = run_concurrent(client, name, prompts)
    for q, a, (t, u) in zip(prompts, alone, res):
        assert t == a, q
        assert u.completion_tokens == CONC_TOKENS
    assert poll_metric(server, "tern_requests_running", 0, model=name) == 0


def test_preemption_equals_alone(start_server, alone):
    # A block is 16 tokens x 23,040 bytes. 12 MiB = 34 blocks, and each
    # request needs ~7 (~53 prompt + 48 output tokens): 16 can't all fit.
    # Slow mode: 8 MiB = 22 blocks for 8 requests of ~5 blocks.
    kv = "8MiB" if slow_mode() else "12MiB"
    srv = start_server("-m", model_path(SMOL), "-t", "2", "--kv-mem", kv,
                       "--ctx", "512")
    c = srv.client()
    model = c.models.list().data[0].id
    res = run_concurrent(c, model, conc_prompts())
    for q, a, (t, u) in zip(conc_prompts(), alone, res):
        assert t == a, q
        assert u.completion_tokens == CONC_TOKENS
    assert metric(srv, "tern_num_preemptions_total", model=model) > 0
    assert poll_metric(srv, "tern_requests_running", 0, model=model) == 0
    assert poll_metric(srv, "tern_kv_blocks_used", 0, model=model) == 0


SYSTEM = ("You are a meticulous museum guide at a large maritime museum. "
          "Visitors ask about ships, navigation, lighthouses, ports, trade "
          "routes and the lives of sailors. Answer accurately and kindly, "
          "mention one exhibit from the museum's collection when it helps, "
          "and keep every answer short enough to read aloud in under a "
          "minute. If you do not know something, say so plainly instead of "
          "guessing, and suggest which gallery the visitor could explore "
          "next. Never invent dates or names of captains. ") * 2


def test_prefix_reuse_changes_nothing(server, client, name, start_server):
    qs = ["How did sailors navigate before GPS?",
          "Why were lighthouses painted with stripes?",
          "What did sailors eat on long voyages?",
          "How does a ship's anchor hold?",
          "What is a sextant?",
          "Why do ships have round portholes?"][:3 if slow_mode() else 6]
    kw = dict(max_tokens=12 if slow_mode() else 24, system=SYSTEM)
    seq = [run_chat(client, name, q, **kw) for q in qs]
    # after the first, every request reuses the shared system prompt
    for _, u in seq[1:]:
        assert u.prompt_tokens_details.cached_tokens >= 128
    conc = run_concurrent(client, name, qs, **kw)
    srv = start_server("-m", model_path(SMOL), "-t", "2", "--ctx", "1024",
                       "--no-prefix-cache")
    c = srv.client()
    nocache = run_concurrent(c, c.models.list().data[0].id, qs, **kw)
    for q, (a, ua), (b, _), (n, un) in zip(qs, seq, conc, nocache):
        assert a == b == n, q
        assert ua.prompt_tokens == un.prompt_tokens
        assert un.prompt_tokens_details.cached_tokens == 0


# ---- metrics

HISTOGRAMS = ["tern_time_to_first_token_seconds",
              "tern_inter_token_latency_seconds",
              "tern_e2e_request_latency_seconds",
              "tern_request_queue_time_seconds",
              "tern_request_prompt_tokens",
              "tern_request_generation_tokens"]
GAUGES = ["tern_requests_running", "tern_requests_waiting",
          "tern_kv_blocks_used", "tern_kv_blocks_free"]
COUNTERS = ["tern_prompt_tokens", "tern_generation_tokens",
            "tern_prefix_cache_queries", "tern_prefix_cache_hits",
            "tern_num_preemptions", "tern_request_success"]


def test_metrics_parse_and_count(server, client, name):
    chat(client, name, "Hi", max_tokens=2)  # something to count
    s0, types = metrics(server)
    for h in HISTOGRAMS:
        assert types.get(h) == "histogram", h
        count = s0[(h + "_count", (("model", name),))]
        assert count > 0, h
        buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in s0.items()
                          if k[0] == h + "_bucket"
                          and dict(k[1]).get("model") == name))
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == count
        vals = [v for _, v in buckets]
        assert vals == sorted(vals), h
    for g in GAUGES:
        assert types.get(g) == "gauge", g
        assert (g, (("model", name),)) in s0, g
    for c in COUNTERS:
        assert types.get(c) == "counter", c
        assert any(k[0] == c + "_total" and dict(k[1]).get("model") == name
                   for k in s0), c
    assert s0[("tern_requests_running", (("model", name),))] == 0
    assert s0[("tern_kv_blocks_free", (("model", name),))] > 0

    r = client.completions.create(model=name, prompt="Metrics test: one, two,",
                                  max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 9
    s1, _ = metrics(server)

    def d(sample, **labels):
        key = (sample, tuple(sorted({"model": name, **labels}.items())))
        return s1.get(key, 0) - s0.get(key, 0)
    assert d("tern_generation_tokens_total") == 9
    assert d("tern_prompt_tokens_total") == r.usage.prompt_tokens
    assert d("tern_request_success_total", outcome="length") == 1
    assert d("tern_request_generation_tokens_sum") == 9
    assert d("tern_request_prompt_tokens_sum") == r.usage.prompt_tokens
    assert d("tern_prefix_cache_queries_total") == r.usage.prompt_tokens
    assert d("tern_prefix_cache_hits_total") == \
        r.usage.prompt_tokens_details.cached_tokens
    for h in ["tern_time_to_first_token_seconds",
              "tern_e2e_request_latency_seconds",
              "tern_request_queue_time_seconds",
              "tern_request_prompt_tokens", "tern_request_generation_tokens"]:
        assert d(h + "_count") == 1, h
    assert d("tern_inter_token_latency_seconds_count") == 8
    assert d("tern_e2e_request_latency_seconds_sum") > 0
    assert d("tern_time_to_first_token_seconds_sum") <= \
        d("tern_e2e_request_latency_seconds_sum")


# ---- API key

def test_api_key(start_server):
    srv = start_server("-m", model_path(SMOL), "-t", "2", "--ctx", "512",
                       "--api-key", "s3cret-key")
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").chat.completions.create(
            model=SMOL, messages=msgs, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").models.list()
    r = requests.post(srv.base + "/v1/chat/completions", timeout=30,
                      json={"messages": msgs, "max_tokens": 2})
    assert r.status_code == 401
    assert r.json()["error"]["message"]
    r = requests.post(srv.base + "/v1/completions", timeout=30,
                      headers={"Authorization": "Bearer s3cret-keyX"},
                      json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 401
    good = srv.client(api_key="s3cret-key")
    model = good.models.list().data[0].id
    r = good.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert r.choices[0].message.content
    assert requests.get(srv.base + "/health", timeout=5).status_code == 200


# ---- several models from a config file

def test_config_two_models(start_server, tmp_path, run_tern):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "models:\n"
        f"  - name: small\n    path: {model_path(SMOL)}\n"
        "    aliases: [default]\n    threads: 2\n    ctx: 512\n"
        f"  - name: gemma\n    path: {model_path('gemma3-270m')}\n"
        "    threads: 2\n    ctx: 512\n"
        f"  - name: gemma-chat\n    path: {model_path('gemma3-270m')}\n"
        "    ctx: 512\n    chat_template: gemma\n")
    srv = start_server("--config", str(cfg))
    c = srv.client()
    ids = {m.id for m in c.models.list().data}
    assert {"small", "gemma"} <= ids
    prompt = "The capital of France is"
    kw = dict(prompt=prompt, max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    small = c.completions.create(model="small", **kw)
    dflt = c.completions.create(model="default", **kw)
    gemma = c.completions.create(model="gemma", **kw)
    assert small.model == "small"
    assert dflt.model == "default"
    assert gemma.model == "gemma"
    assert small.choices[0].text == dflt.choices[0].text
    assert small.choices[0].text != gemma.choices[0].text
    assert small.usage.prompt_tokens == len(tokenize(run_tern, prompt))
    # gemma adds a BOS token, and it is counted
    g_ids = tokenize(run_tern, prompt, "gemma3-270m")
    assert g_ids[0] == 2
    assert gemma.usage.prompt_tokens == len(g_ids)
    # the Gemma 3 270M we ship is a base model: no chat template, so chat
    # is refused with a clear error, unless a format is configured
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="gemma", max_tokens=8,
                                  messages=[{"role": "user", "content": "Hi"}])
    body = ei.value.body
    assert body["code"] == "chat_template_missing", body
    assert body["param"] == "messages"
    assert "no chat template" in body["message"]
    assert "/v1/completions" in body["message"]
    r = c.chat.completions.create(model="gemma-chat", max_tokens=8,
                                  messages=[{"role": "user", "content": "Hi"}])
    assert r.model == "gemma-chat" and r.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", **kw)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", max_tokens=2,
                                  messages=[{"role": "user", "content": "Hi"}])
    # both engines report their own metrics
    s, _ = metrics(srv)
    for m in ("small", "gemma"):
        assert s[("tern_request_success_total",
                  (("model", m), ("outcome", "length")))] >= 1


def test_two_models_at_once_share_the_pool(start_server, tmp_path):
    """Both engines step at the same time on the one compute pool: every
    greedy answer equals the same request sent alone."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "threads: 2\n"
        "models:\n"
        f"  - name: small\n    path: {model_path(SMOL)}\n    ctx: 512\n"
        f"  - name: gemma\n    path: {model_path('gemma3-270m')}\n"
        "    ctx: 512\n    threads: 1\n")
    srv = start_server("--config", str(cfg))
    c = srv.client()
    n_tok = 8 if slow_mode() else 24
    jobs = [(m, f"Story {i}: once upon a time") for m in ("small", "gemma")
            for i in range(3)]

    def ask(job):
        m, prompt = job
        r = c.completions.create(model=m, prompt=prompt, max_tokens=n_tok,
                                 temperature=0,
                                 extra_body={"ignore_eos": True})
        return r.choices[0].text

    alone = [ask(j) for j in jobs]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(ask, jobs))
    assert together == alone


# ---- SIGTERM drain

DRAIN_TOKENS = 150 if slow_mode() else 400


def open_stream(srv, max_tokens):
    r = requests.post(srv.base + "/v1/completions", stream=True, timeout=120,
                      json={"prompt": "Tell me a very long story.",
                            "stream": True, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True,
                            "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    return r


def wait_status(url, want, timeout=5.0):
    deadline = time.time() + timeout
    while True:
        code = requests.get(url, timeout=5).status_code
        if code == want or time.time() > deadline:
            return code
        time.sleep(0.02)


def test_sigterm_drains_running_stream(start_server):
    # a generous deadline: a loaded 2-core machine can be slow
    srv = start_server("-m", model_path(SMOL), "-t", "2", "--ctx", "1024",
                       "--drain-timeout", "300")
    model = srv.client().models.list().data[0].id
    r = open_stream(srv, DRAIN_TOKENS)
    events = sse_events(r)
    first = [json.loads(next(events)) for _ in range(3)]
    assert all(e["choices"] for e in first)
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_status(srv.base + "/ready", 503) == 503
    assert requests.get(srv.base + "/health", timeout=5).status_code == 200
    nr = requests.post(srv.base + "/v1/completions", timeout=30,
                       json={"model": model, "prompt": "Hi", "max_tokens": 2})
    assert nr.status_code == 503
    assert nr.json()["error"]["message"]
    with pytest.raises(openai.InternalServerError):
        srv.client().completions.create(model=model, prompt="Hi",
                                        max_tokens=2)
    assert srv.proc.poll() is None  # still draining
    rest = list(events)
    assert rest[-1] == "[DONE]"
    chunks = first + [json.loads(e) for e in rest[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks
              if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["length"], srv.read_log()[-2000:]
    assert chunks[-1]["usage"]["completion_tokens"] == DRAIN_TOKENS
    t0 = time.time()
    assert srv.proc.wait(timeout=15) == 0
    assert time.time() - t0 < 10
    assert "draining" in srv.read_log()


def test_sigterm_drain_timeout_cuts_stream(start_server):
    # far more tokens than 1 s can decode in any build (a TSan build whose
    # kernels run near full speed once finished 150 within the second)
    n_tokens = 1000
    srv = start_server("-m", model_path(SMOL), "-t", "2", "--ctx", "1024",
                       "--drain-timeout", "1")
    r = open_stream(srv, n_tokens)
    events = sse_events(r)
    for _ in range(3):
        next(events)
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    rest = []
    try:
        for e in events:
            rest.append(e)
    except requests.exceptions.RequestException:
        pass  # the connection was cut: fine
    chunks = [json.loads(e) for e in rest if e != "[DONE]"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks
              if c["choices"] and c["choices"][0]["finish_reason"]]
    assert "length" not in finish  # it did not run to the end
    n_text = sum(1 for c in chunks
                 if c["choices"] and c["choices"][0].get("text"))
    assert n_text < n_tokens - 3
    assert srv.proc.wait(timeout=20) == 0
    assert time.time() - t0 < 1 + 5 + 4
    assert "drain deadline passed" in srv.read_log()


# ---- a client that goes away mid-stream

def test_client_disconnect_frees_request(server, client, name):
    assert poll_metric(server, "tern_requests_running", 0, model=name) == 0
    idle_used = metric(server, "tern_kv_blocks_used", model=name)
    body = json.dumps({"model": name, "prompt": "Tell me a very long story.",
                       "stream": True, "max_tokens": 1500, "temperature": 0,
                       "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    got = 0
    while got < 5:
        line = resp.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: "):
            got += 1
    assert metric(server, "tern_requests_running", model=name) == 1
    assert metric(server, "tern_kv_blocks_used", model=name) > idle_used
    gen0 = metric(server, "tern_generation_tokens_total", model=name)
    conn.sock.shutdown(2)
    conn.close()
    # 1500 tokens take far longer than this: the request was cancelled
    assert poll_metric(server, "tern_requests_running", 0, timeout=5,
                       model=name) == 0
    assert poll_metric(server, "tern_kv_blocks_used", idle_used, timeout=5,
                       model=name) == idle_used
    gen1 = metric(server, "tern_generation_tokens_total", model=name)
    assert gen1 - gen0 < 500
    # the server keeps serving
    r = chat(client, name, "Hi", max_tokens=4)
    assert r.choices[0].message.content


# ---- more sampling and stream details

def test_stream_multibyte_text(client, name):
    """Tokens that split a UTF-8 character: the stream still carries whole,
    valid characters and the same text as the plain answer."""
    kw = dict(model=name, prompt="Write three emoji:", max_tokens=16,
              temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert "\ufffd" not in full
    assert any(ord(ch) > 0xFFFF for ch in full)  # an emoji came out
    chunks = list(client.completions.create(stream=True, **kw))
    parts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(parts) == full
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_across_tokens(client, name):
    """A stop string that starts inside one token and ends in the next:
    cut mid-token, never leaked by the stream, counted up to the token
    that completed it."""
    kw = dict(model=name, prompt="The capital of France is", max_tokens=16,
              temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(logprobs=1, **kw).choices[0]
    toks = full.logprobs.tokens
    # the first pair of tokens (after the first) with 2+ visible chars each
    for i in range(1, len(toks) - 1):
        if len(toks[i].strip()) >= 2 and len(toks[i + 1].strip()) >= 2:
            break
    else:
        pytest.fail(f"no suitable tokens in {toks}")
    start = len("".join(toks[:i]))
    stop = toks[i][-2:] + toks[i + 1][:2]
    want = full.text[:full.text.index(stop)]
    assert len(want) >= start  # the stop begins inside token i
    r = client.completions.create(stop=stop, **kw)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == i + 2
    chunks = list(client.completions.create(
        stop=stop, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == i + 2


def test_sampling_filters_reduce_to_greedy(client, name):
    kw = dict(model=name, prompt="My favourite animal is", max_tokens=12)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(temperature=1.5, seed=3,
                                      extra_body=extra, **kw)
        assert r.choices[0].text == greedy, extra
    r = client.completions.create(temperature=1.5, seed=3, top_p=1e-6, **kw)
    assert r.choices[0].text == greedy


def test_seeded_stream_equals_nonstream(client, name):
    kw = dict(model=name, prompt="Once upon a time", max_tokens=16,
              temperature=1.0, seed=11)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full


def test_logit_bias(client, name, run_tern):
    kw = dict(model=name, prompt="The capital of France is", max_tokens=6,
              temperature=0, extra_body={"ignore_eos": True})
    paris = tokenize(run_tern, " Paris")
    assert len(paris) == 1
    base = client.completions.create(**kw).choices[0].text
    assert base.startswith(" Paris")
    r = client.completions.create(logit_bias={str(paris[0]): -100}, **kw)
    assert "Paris" not in r.choices[0].text
    r = client.completions.create(logit_bias={str(paris[0]): 100}, **kw)
    assert r.choices[0].text == " Paris" * 6


def test_min_tokens_and_ignore_eos(client, name):
    q = dict(model=name, temperature=0,
             messages=[{"role": "user", "content": "Hi"}])
    base = client.chat.completions.create(max_tokens=64, **q)
    assert base.choices[0].finish_reason == "stop"
    n = base.usage.completion_tokens
    r = client.chat.completions.create(max_tokens=64,
                                       extra_body={"min_tokens": n + 5}, **q)
    assert r.usage.completion_tokens >= n + 5
    assert r.choices[0].message.content.startswith(
        base.choices[0].message.content)
    r = client.chat.completions.create(max_tokens=n + 8,
                                       extra_body={"ignore_eos": True}, **q)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == n + 8


def test_stream_n_with_usage(client, name):
    kw = dict(model=name, max_tokens=8, n=2, temperature=0.8, seed=21,
              messages=[{"role": "user", "content": "Name a fruit."}])
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    for i in range(2):
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks
                       if ch.choices and ch.choices[0].index == i)
        assert text == full.choices[i].message.content
        fin = [ch.choices[0].finish_reason for ch in chunks if ch.choices
               and ch.choices[0].index == i and ch.choices[0].finish_reason]
        assert fin == [full.choices[i].finish_reason]
    assert usage_tuple(chunks[-1].usage) == usage_tuple(full.usage)

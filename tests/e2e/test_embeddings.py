"""POST /v1/embeddings against a real model: the vectors against
transformers' on the same GGUF (tools/gen_embedding_fixture.py), exact
batch invariance, the OpenAI client, and bad input."""
import base64
import concurrent.futures as cf
import json
import math
import struct

import pytest
import requests

from conftest import FIXTURES

FX = json.loads((FIXTURES / "embeddings" / "smollm2.json").read_text())


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b))


def embed(server, body):
    r = requests.post(server.base + "/v1/embeddings", json=body, timeout=60)
    return r


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_matches_transformers(server, pool):
    for it in FX["items"]:
        r = embed(server, {"input": it["ids"], "pooling": pool,
                           "normalize": False})
        assert r.status_code == 200, r.text
        d = r.json()
        v = d["data"][0]["embedding"]
        assert len(v) == len(it[pool]) == 576
        assert cos(v, it[pool]) > 0.995, (it["text"], cos(v, it[pool]))
        assert d["usage"]["prompt_tokens"] == len(it["ids"])
        # text input tokenizes to the same ids
        t = embed(server, {"input": it["text"], "pooling": pool,
                           "normalize": False}).json()["data"][0]["embedding"]
        assert t == v


def test_batch_invariance(server):
    texts = [it["text"] for it in FX["items"]]
    alone = [embed(server, {"input": t}).json()["data"][0]["embedding"]
             for t in texts]
    listed = embed(server, {"input": texts}).json()["data"]
    assert [x["index"] for x in listed] == [0, 1, 2]
    assert [x["embedding"] for x in listed] == alone

    def chat(_):
        return requests.post(server.base + "/v1/chat/completions", timeout=60,
                             json={"messages": [{"role": "user",
                                                 "content": "Count to 20"}],
                                   "max_tokens": 24}).status_code

    def emb(i):
        return embed(server, {"input": texts[i % 3]}).json()["data"][0][
            "embedding"]
    with cf.ThreadPoolExecutor(8) as ex:
        chats = [ex.submit(chat, i) for i in range(4)]
        embs = [ex.submit(emb, i) for i in range(9)]
        assert all(f.result() == 200 for f in chats)
        for i, f in enumerate(embs):
            assert f.result() == alone[i % 3]


def test_openai_client_and_formats(server):
    c = server.client()
    r = c.embeddings.create(model=c.models.list().data[0].id,
                            input=["hello world", "goodbye"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 576
    assert abs(sum(x * x for x in r.data[0].embedding) - 1) < 1e-4
    f = embed(server, {"input": "hello world"}).json()["data"][0]["embedding"]
    b = embed(server, {"input": "hello world",
                       "encoding_format": "base64"}).json()["data"][0][
        "embedding"]
    raw = base64.b64decode(b)
    vals = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert max(abs(x - y) for x, y in zip(vals, f)) < 1e-6
    r = embed(server, {"input": "hello world", "dimensions": 576})
    assert r.status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "foo": 1}, "foo"),
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [1, -5]}, "input"),
    ({"input": [10 ** 9]}, "input"),
    ({"input": {"a": 1}}, "input"),
    ({"input": "x", "dimensions": 64}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "pooling": "cls"}, "pooling"),
    ({"input": "x", "normalize": "yes"}, "normalize"),
    ({"input": ["x"] * 65}, "input"),
])
def test_bad_input(server, body, param):
    r = embed(server, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert embed(server, {"input": "still fine"}).status_code == 200


def test_unknown_model(server):
    r = embed(server, {"input": "x", "model": "nope"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# ---- the classifier route: nearest neighbours over embedded examples

CODE = ["Write a Python function that sorts a list",
        "Fix this SQL query: SELECT * FROM users WHERE",
        "How do I reverse a string in JavaScript?",
        "Implement binary search in C"]
CHAT = ["What is the capital of France?", "Tell me a joke about cats",
        "How are you today?", "Who wrote Romeo and Juliet?"]


@pytest.fixture(scope="module")
def cls_server(tern_bin, tmp_path_factory):
    from conftest import TernServer, model_path
    d = tmp_path_factory.mktemp("cls")
    (d / "chat.jsonl").write_text("".join(
        json.dumps({"text": t, "to": "chat"}) + "\n" for t in CHAT))
    inline = "".join(f"      - {{text: {json.dumps(t)}, to: code}}\n"
                     for t in CODE)
    (d / "cfg.yaml").write_text(f"""models:
  - name: smollm2
    path: {model_path("smollm2-135m")}
    aliases: [code, chat]
routes:
  - name: topic
    strategy: classifier
    k: 3
    examples_file: chat.jsonl
    examples:
{inline}""")
    s = TernServer(tern_bin, ["--config", str(d / "cfg.yaml"), "-t", "2"],
                   str(d / "serve.log"))
    yield s
    assert s.stop() == 0, s.read_log()[-3000:]


def ask(srv, text, **kw):
    return requests.post(srv.base + "/v1/chat/completions", timeout=60,
                         json={"model": "topic", "max_tokens": 3,
                               "temperature": 0, "messages": [
                                   {"role": "user", "content": text}], **kw})


def test_classifier_routes_by_topic(cls_server):
    assert "4 examples" not in cls_server.read_log()
    assert "8 examples embedded" in cls_server.read_log()
    for text, want in [("Write a C function to add two numbers", "code"),
                       ("debug my python code please", "code"),
                       ("What is the tallest mountain?", "chat"),
                       ("Tell me about dogs", "chat")]:
        for _ in range(2):  # deterministic
            r = ask(cls_server, text)
            assert r.status_code == 200, r.text
            assert r.headers["x-tern-route"] == "topic"
            assert r.headers["x-tern-model"] == want, text
            assert 0 < float(r.headers["x-tern-confidence"]) <= 1
    # streamed too
    r = ask(cls_server, "Implement quicksort in Rust", stream=True)
    assert r.status_code == 200 and r.headers["x-tern-model"] == "code"
    assert r.text.rstrip().endswith("data: [DONE]")
    models = requests.get(cls_server.base + "/v1/models", timeout=10).json()
    topic = [m for m in models["data"] if m["id"] == "topic"][0]
    assert topic["meta"] == {"kind": "route", "strategy": "classifier"}

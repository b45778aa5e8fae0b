"""Structured output against a real model: JSON schemas, JSON mode,
choices, regexes and grammars through the OpenAI API, the openai client and
LangChain; early exit and batching never change the answer."""
import concurrent.futures as cf
import json
import re

import jsonschema
import pytest
import requests

from conftest import slow_mode

MODEL = "SmolLM2-135M-Instruct.Q4_1"

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                     "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "email", "tags"],
        "additionalProperties": False,
    },
    "nested": {
        "$defs": {"point": {"type": "object", "properties": {
            "x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"]}},
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"},
                       "maxItems": 2},
            "label": {"anyOf": [{"type": "null"},
                                {"type": "string", "maxLength": 10}]},
            "ok": {"type": "boolean"},
        },
        "required": ["points", "ok"],
    },
    "dates": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "level": {"type": "integer", "minimum": -5, "exclusiveMaximum": 5},
        },
        "required": ["day", "id", "level"],
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5},
                        {"const": "fixed"}],
        "items": False, "minItems": 2,
    },
}


def chat(server, content, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 300, "temperature": 0}
    body.update(extra)
    r = requests.post(server.base + "/v1/chat/completions", json=body,
                      timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(server, name):
    """Sampled outputs (several seeds, temperature 1) parse and validate."""
    schema = SCHEMAS[name]
    seeds = [1] if slow_mode() else [1, 2, 3]
    for seed in seeds:
        out = chat(server, "Fill in the JSON.", temperature=1.0, seed=seed,
                   response_format={"type": "json_schema", "json_schema": {
                       "name": name, "schema": schema, "strict": True}})
        ch = out["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["message"]["content"]), schema)


def test_json_object_mode(server):
    out = chat(server, "Describe a cat as JSON.", max_tokens=400,
               response_format={"type": "json_object"})
    ch = out["choices"][0]
    assert ch["finish_reason"] == "stop", ch
    assert isinstance(json.loads(ch["message"]["content"]), dict)


def test_choice_regex_and_grammar(server):
    labels = ["positive", "negative", "neutral"]
    out = chat(server, "Is 'I love it' positive or negative?",
               structured_outputs={"choice": labels})
    assert out["choices"][0]["message"]["content"] in labels
    out = chat(server, "Pick a color.", guided_choice=["red", "green"])
    assert out["choices"][0]["message"]["content"] in ("red", "green")
    rx = r"\(\d{3}\) \d{3}-\d{4}"
    out = chat(server, "A phone number, please.", temperature=1.0, seed=4,
               structured_outputs={"regex": rx})
    assert re.fullmatch(rx, out["choices"][0]["message"]["content"])
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    out = chat(server, "Answer.", grammar=gbnf)
    assert out["choices"][0]["message"]["content"] in (
        "The answer is yes.", "The answer is no.")


def metric(server, name):
    text = requests.get(server.base + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_early_exit_same_answer(server):
    """Once one option remains, the rest is filled without forward passes:
    the answer equals the one decoded token by token (logprobs on turns the
    fill off), in fewer decoded tokens."""
    options = ["the first option, which is rather long to spell out",
               "a second option that is also long enough to notice",
               "neither of them, thank you very much for asking"]
    prompt = "Which option do you take?"
    before = metric(server, "tern_grammar_forced_tokens_total")
    fast = chat(server, prompt, structured_outputs={"choice": options})
    forced = metric(server, "tern_grammar_forced_tokens_total") - before
    slow = chat(server, prompt, structured_outputs={"choice": options},
                logprobs=True)
    a = fast["choices"][0]["message"]["content"]
    assert a in options
    assert a == slow["choices"][0]["message"]["content"]
    assert forced > 0
    assert fast["choices"][0]["finish_reason"] == "stop"
    # the forced tokens count as output
    assert fast["usage"]["completion_tokens"] >= forced


def test_streamed_json_parses(server):
    schema = SCHEMAS["person"]
    body = {"model": MODEL, "stream": True, "max_tokens": 300,
            "messages": [{"role": "user", "content": "A person as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "p", "schema": schema}}}
    text = ""
    with requests.post(server.base + "/v1/chat/completions", json=body,
                       stream=True, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            d = json.loads(line[6:])
            for c in d["choices"]:
                text += c["delta"].get("content") or ""
    jsonschema.validate(json.loads(text), schema)


def test_completions_endpoint(server):
    schema = SCHEMAS["tuple"]
    r = requests.post(server.base + "/v1/completions", json={
        "model": MODEL, "prompt": "JSON:", "max_tokens": 100, "n": 2,
        "temperature": 1.0, "seed": 9,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "t", "schema": schema}}},
        timeout=300)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        jsonschema.validate(json.loads(c["text"]), schema)


def test_batch_invariance_mixed(server):
    """Greedy answers of constrained and free requests run together equal
    the answers each gets alone."""
    reqs = [
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": SCHEMAS["person"]}}},
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": SCHEMAS["nested"]}}},
        {"structured_outputs": {"regex": "[A-Z][a-z]{2,8}( [a-z]{2,8}){3}\\."}},
        {},
        {"max_tokens": 40},
        {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
    ]
    prompts = ["Tell me about a person.", "Points please.", "A sentence.",
               "Write a haiku.", "Count to ten.", "Pick one."]
    if slow_mode():
        reqs, prompts = reqs[:4], prompts[:4]
    alone = [chat(server, p, **x)["choices"][0]["message"]["content"]
             for p, x in zip(prompts, reqs)]
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        futs = [ex.submit(chat, server, p, **x) for p, x in zip(prompts, reqs)]
        together = [f.result()["choices"][0]["message"]["content"]
                    for f in futs]
    assert together == alone


def test_openai_client_and_langchain(server):
    pydantic = pytest.importorskip("pydantic")
    lc = pytest.importorskip("langchain_openai")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)
        population: int = pydantic.Field(ge=0, le=100000000)

    cl = server.client()
    parsed = cl.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Name a city."}],
        response_format=City, temperature=0, max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, City)

    llm = lc.ChatOpenAI(base_url=server.base + "/v1", api_key="none",
                        model=MODEL, temperature=0, max_tokens=200)
    for method in ("json_schema",):
        out = llm.with_structured_output(City, method=method).invoke(
            "Name a big city.")
        assert isinstance(out, City)


def test_cli_constraints(run_tern, tmp_path):
    from conftest import model_path
    m = model_path("smollm2-135m")
    r = run_tern("run", "-m", m, "--temp", "0", "-p", "Is the sky blue?",
                 "--choice", "yes", "--choice", "no")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() in ("yes", "no")
    sp = tmp_path / "s.json"
    sp.write_text(json.dumps(SCHEMAS["person"]))
    r = run_tern("run", "-m", m, "--temp", "0.7", "--seed", "3", "-n", "300",
                 "-p", "A person:", "--json-schema", str(sp))
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), SCHEMAS["person"])
    r = run_tern("run", "-m", m, "-p", "x", "--regex", "(ab")
    assert r.returncode == 1
    assert b"--regex" in r.stderr and b"unclosed" in r.stderr
    r = run_tern("run", "-m", m, "-p", "x", "--json", "--choice", "a")
    assert r.returncode == 1 and b"give one" in r.stderr


def test_option_probabilities_and_min_prob(server):
    """With logprobs, a choice answer reports each option's probability
    (options told apart by their first token: they sum to 1); early_exit
    with a minimum probability ends on the first option that passes it."""
    labels = ["red", "green", "blue"]
    q = "Which color is the sky? Answer red, green or blue."
    out = chat(server, q, structured_outputs={"choice": labels}, logprobs=True)
    probs = out["choices"][0]["option_probs"]
    assert set(probs) == set(labels)
    assert abs(sum(probs.values()) - 1.0) < 1e-3, probs
    out = chat(server, q, guided_choice=labels,
               early_exit={"min_prob": 1e-6})
    ch = out["choices"][0]
    best = max(ch["option_probs"], key=ch["option_probs"].get)
    assert ch["message"]["content"] == best
    assert ch["finish_reason"] == "stop"
    # streamed: the last chunk carries them
    body = {"model": MODEL, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": q}],
            "structured_outputs": {"choice": labels}, "logprobs": True}
    last = None
    with requests.post(server.base + "/v1/chat/completions", json=body,
                       stream=True, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                d = json.loads(line[6:])
                if d["choices"] and d["choices"][0]["finish_reason"]:
                    last = d["choices"][0]
    assert last and set(last["option_probs"]) == set(labels)
    # early_exit needs a choice list
    r = requests.post(server.base + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "early_exit": {"min_prob": 0.5}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "early_exit"


def test_forced_text_inside_a_character(server):
    """Options that share the first bytes of a character: the forced rest
    can start or end inside a UTF-8 character, which is filled or drafted
    only when the tokenizer spells it back byte for byte (seed 259 once
    ended in 'token does not continue the output')."""
    schema = {"enum": ["日本", "日本語", "中文", "español", "a\nb"]}
    for seed in (259, 1, 2, 3):
        out = chat(server, "Answer with JSON that fits this schema: "
                   + json.dumps(schema), temperature=1.0, seed=seed,
                   max_tokens=64, response_format={
                       "type": "json_schema",
                       "json_schema": {"name": "s", "schema": schema}})
        ch = out["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["message"]["content"]), schema)

"""Tool calling against real models through real clients.

Qwen2.5-Coder's own template has a tools section (the <tool_call>
convention); SmolLM2's and the built-in gemma format have none, so tern
writes the tools and the tool turns into the prompt itself. All must give
the same OpenAI surface:

- forced calls (tool_choice "required" or a named function) decode under a
  grammar, so the arguments always parse and validate against the
  function's `parameters` (nested objects, enums, bounded integers, arrays);
  parallel_tool_calls false means exactly one call;
- a streamed call, put back together the way OpenAI clients do it
  (arguments concatenated by index), equals the non-streamed one;
- "auto" answers either text or well-formed calls (which one is the model's
  business), streamed or not, "none" never calls; several calls at once
  (Qwen 1.5B) come as indexes 0, 1, ...;
- forced calls batched together equal the calls made alone;
- a whole round trip (call, tool result, answer) renders and answers;
- chat_template_kwargs reach a --chat-template file; a template that
  renders tools some other way is refused for tools (400), not guessed at;
- the openai client's parse() helpers and LangChain's bind_tools and
  with_structured_output (function_calling, json_mode, json_schema) work;
- every malformed tool request is a 400 naming the field (parameters that
  do not describe an object among them), and the server answers normally
  afterwards.

One server per model, shared by the module; greedy decoding and small
max_tokens keep it quick (forced calls take 30 to 60 tokens). Under the
sanitizer build (TERN_SLOW=1) only one Qwen forced call and the stream,
the SmolLM2 checks, the template file and the bad inputs run (no LangChain,
no 1.5B, no Gemma)."""
import json
import re

import jsonschema
import pytest
import requests

from conftest import MODELS, TernServer, model_path, slow_mode

SMOL = "SmolLM2-135M-Instruct.Q4_1"
QWEN = "qwen2.5-coder-0.5b-instruct-q4_k_m"
QWEN15 = "qwen2.5-coder-1.5b-instruct-q4_k_m"

CALL_ID = re.compile(r"^call_[0-9a-f]{16}$")

# Three functions with different schema shapes: an enum, a nested object
# with a bounded integer, an array of bounded length.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        }}},
    {"type": "function", "function": {
        "name": "book_table",
        "description": "Book a table at a restaurant.",
        "parameters": {
            "type": "object",
            "properties": {
                "restaurant": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 40},
                        "city": {"type": "string", "maxLength": 40},
                    },
                    "required": ["name", "city"],
                },
                "people": {"type": "integer", "minimum": 1, "maximum": 12},
            },
            "required": ["restaurant", "people"],
        }}},
    {"type": "function", "function": {
        "name": "add_tags",
        "description": "Add tags to a note.",
        "parameters": {
            "type": "object",
            "properties": {
                "note_id": {"type": "integer", "minimum": 0},
                "tags": {"type": "array",
                         "items": {"type": "string", "maxLength": 12},
                         "minItems": 1, "maxItems": 3},
            },
            "required": ["note_id", "tags"],
        }}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
W = TOOLS[0]
ASK = {
    "get_weather": "What's the weather in Paris?",
    "book_table": "Book a table for 4 at Chez Marcel in Lyon.",
    "add_tags": "Tag note 7 with work and urgent.",
}


# ---- servers, one per model for the module

def qwen_path(size):
    p = MODELS / f"qwen2.5-coder-{size}-instruct-q4_k_m.gguf"
    if not p.exists():
        pytest.fail(f"model qwen2.5-coder-{size} missing: run make models")
    return str(p)


def serve(tern_bin, tmp_path_factory, path):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = TernServer(tern_bin, ["-m", path, "-t", "2", "--ctx", "2048"],
                     str(log))
    yield srv
    rc = srv.stop()
    assert rc == 0, f"tern serve exited {rc}: {srv.read_log()[-3000:]}"


@pytest.fixture(scope="module")
def qwen(tern_bin, tmp_path_factory):
    yield from serve(tern_bin, tmp_path_factory, qwen_path("0.5b"))


@pytest.fixture(scope="module")
def qwen15(tern_bin, tmp_path_factory):
    # optional: `make models` fetches the 0.5B only (the 1.5B is a 1 GB
    # download); `tern pull qwen2.5-coder-1.5b` enables this part
    p = MODELS / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if not p.exists():
        pytest.skip("qwen2.5-coder-1.5b not downloaded "
                    "(tern pull --dir models qwen2.5-coder-1.5b)")
    yield from serve(tern_bin, tmp_path_factory, str(p))


@pytest.fixture(scope="module")
def smol(tern_bin, tmp_path_factory):
    yield from serve(tern_bin, tmp_path_factory, model_path("smollm2-135m"))


skip_slow = pytest.mark.skipif(slow_mode(), reason="trimmed under ASan")


# ---- helpers

def named(name):
    return {"type": "function", "function": {"name": name}}


def post(srv, body, path="/v1/chat/completions"):
    return requests.post(srv.base + path, json=body, timeout=300)


def chat(srv, model, content, max_tokens=80, **extra):
    """A greedy chat request; the JSON answer (200 asserted)."""
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": ([{"role": "user", "content": content}]
                         if isinstance(content, str) else content)}
    body.update(extra)
    r = post(srv, body)
    assert r.status_code == 200, r.text
    return r.json()


def check_calls(calls, tools=TOOLS):
    """Well-formed OpenAI tool calls whose arguments validate against the
    named function's parameters; returns [(name, arguments dict)]."""
    params = {t["function"]["name"]: t["function"].get("parameters")
              for t in tools}
    assert calls, "no tool_calls"
    out = []
    for c in calls:
        c = c if isinstance(c, dict) else c.model_dump()
        assert CALL_ID.match(c["id"]), f"call id {c['id']!r}"
        assert c["type"] == "function", c
        name, text = c["function"]["name"], c["function"]["arguments"]
        assert name in params, f"{name!r} is not among the tools"
        assert isinstance(text, str), f"arguments must be a JSON string: {c}"
        args = json.loads(text)
        assert isinstance(args, dict), f"arguments not an object: {text}"
        if params[name]:
            jsonschema.validate(args, params[name])
        # compact JSON: no whitespace outside strings
        assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', "", text)), \
            f"arguments not compact: {text}"
        out.append((name, args))
    ids = [c["id"] if isinstance(c, dict) else c.id for c in calls]
    assert len(set(ids)) == len(ids), f"duplicate call ids {ids}"
    return out


def forced(out):
    """The calls of a forced answer (finish_reason, content checked)."""
    ch = out["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    assert ch["message"]["content"] is None, ch["message"]
    return check_calls(ch["message"].get("tool_calls"))


def check_auto(message, finish, tools=TOOLS):
    """An "auto" answer: text, or calls to the given tools; not both
    missing, and finish_reason agrees."""
    calls = message.get("tool_calls")
    if calls:
        assert finish == "tool_calls", (finish, message)
        return check_calls(calls, tools)
    assert isinstance(message["content"], str) and message["content"], message
    assert finish in ("stop", "length"), (finish, message)
    return []


def reassemble(stream):
    """OpenAI chunks (the openai client's objects) put together as clients
    do it: content appended, each tool call's fields set by its index and
    its arguments concatenated. Returns (content, calls, finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            assert ch.index == 0
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {
                    "id": None, "type": None,
                    "function": {"name": "", "arguments": ""}})
                if tc.id:
                    c["id"] = tc.id
                if tc.type:
                    c["type"] = tc.type
                if tc.function and tc.function.name:
                    c["function"]["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    c["function"]["arguments"] += tc.function.arguments
            if ch.finish_reason:
                assert finish is None, "two finish reasons"
                finish = ch.finish_reason
    assert sorted(calls) == list(range(len(calls))), sorted(calls)
    return content, [calls[k] for k in sorted(calls)], finish


# ---- forced calls, Qwen2.5-Coder 0.5B (its template's tools section)

@pytest.mark.parametrize("name", sorted(PARAMS))
def test_named_call_validates(qwen, name):
    if slow_mode():
        pytest.skip("trimmed under ASan: the SmolLM2 forced call covers "
                    "the path")
    cl = qwen.client()
    out = cl.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": ASK[name]}],
        tools=TOOLS, tool_choice=named(name), temperature=0, max_tokens=80)
    calls = forced(out.model_dump())
    assert [n for n, _ in calls] == [name] * len(calls), calls


@skip_slow
def test_required_and_parallel_false(qwen):
    """tool_choice "required" calls one of the tools; with
    parallel_tool_calls false exactly one call even when the question asks
    for two."""
    out = chat(qwen, QWEN, ASK["add_tags"], tools=TOOLS,
               tool_choice="required")
    assert forced(out)
    two = "What's the weather in Paris and in Rome, in celsius?"
    out = chat(qwen, QWEN, two, tools=TOOLS, tool_choice="required",
               parallel_tool_calls=False)
    calls = forced(out)
    assert len(calls) == 1, calls
    assert calls[0][0] == "get_weather", calls


def test_streamed_call_equals_non_streamed(qwen):
    cl = qwen.client()
    kw = dict(model=QWEN, tools=TOOLS, tool_choice=named("book_table"),
              temperature=0, max_tokens=80,
              messages=[{"role": "user", "content": ASK["book_table"]}])
    whole = cl.chat.completions.create(**kw).choices[0]
    content, calls, finish = reassemble(
        cl.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" == whole.finish_reason
    assert content == "", f"streamed content besides the call: {content!r}"
    check_calls(calls)
    want = [c.model_dump() for c in whole.message.tool_calls]
    assert [(c["function"]["name"], c["function"]["arguments"])
            for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in want]
    assert all(c["type"] == "function" for c in calls)


@skip_slow
def test_openai_parse_pydantic_tool(qwen):
    """openai.pydantic_function_tool (a strict function, additionalProperties
    false) with parse(): the arguments come back as the model class."""
    import openai
    pydantic = pytest.importorskip("pydantic")

    class Lookup(pydantic.BaseModel):
        """Look up a word in the dictionary."""
        word: str = pydantic.Field(max_length=20)
        language: str = pydantic.Field(max_length=10)

    out = qwen.client().chat.completions.parse(
        model=QWEN, temperature=0, max_tokens=60,
        messages=[{"role": "user",
                   "content": "What does 'chat' mean in French?"}],
        tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice=named("Lookup"))
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert isinstance(msg.tool_calls[0].function.parsed_arguments, Lookup)


# ---- auto and none

@skip_slow
@pytest.mark.parametrize("question", [ASK["get_weather"], "Say hello."])
def test_auto_text_or_calls(qwen, question):
    """Either answer is fine; it must be well-formed, and the stream must
    carry the same answer (text that might be a call is held back)."""
    out = chat(qwen, QWEN, question, tools=TOOLS, tool_choice="auto")
    ch = out["choices"][0]
    calls = check_auto(ch["message"], ch["finish_reason"])
    content, scalls, finish = reassemble(qwen.client().chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": question}],
        tools=TOOLS, temperature=0, max_tokens=80, stream=True))
    assert finish == ch["finish_reason"]
    assert content == (ch["message"]["content"] or "")
    if calls:
        assert [(n, a) for n, a in check_calls(scalls)] == calls
    else:
        assert not scalls, scalls


@skip_slow
def test_tool_choice_none(qwen):
    out = chat(qwen, QWEN, ASK["get_weather"], tools=TOOLS,
               tool_choice="none")
    ch = out["choices"][0]
    assert not ch["message"].get("tool_calls"), ch
    assert ch["finish_reason"] in ("stop", "length"), ch
    assert isinstance(ch["message"]["content"], str)


# ---- a round trip: call, result, answer

@skip_slow
def test_round_trip(qwen):
    """The assistant message goes back as the openai client returned it
    (content and refusal null), then the tool's result; tools are still
    given and tool_choice is left to its default."""
    cl = qwen.client()
    msgs = [{"role": "user", "content": ASK["get_weather"]}]
    first = cl.chat.completions.create(
        model=QWEN, messages=msgs, tools=TOOLS,
        tool_choice=named("get_weather"), temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    msgs.append(first.choices[0].message)
    msgs.append({"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"temperature": 21, "sky": "sunny"})})
    second = cl.chat.completions.create(
        model=QWEN, messages=msgs, tools=TOOLS, temperature=0,
        max_tokens=40)
    ch = second.choices[0]
    assert ch.finish_reason in ("stop", "length"), ch
    assert isinstance(ch.message.content, str) and ch.message.content, ch
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


# ---- SmolLM2: no tools section, tern writes them in

def test_smollm2_forced_call(smol):
    plain = chat(smol, SMOL, ASK["get_weather"], max_tokens=1)
    out = chat(smol, SMOL, ASK["get_weather"], tools=TOOLS,
               tool_choice=named("get_weather"), parallel_tool_calls=False)
    calls = forced(out)
    assert [n for n, _ in calls] == ["get_weather"]
    # the tools are in the prompt: it grew by their description
    grew = out["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    assert grew > 100, f"prompt grew by {grew} tokens with three tools"
    if not slow_mode():
        out = chat(smol, SMOL, ASK["book_table"], tools=TOOLS,
                   tool_choice="required", parallel_tool_calls=False)
        assert len(forced(out)) == 1


@skip_slow
def test_smollm2_tool_turns_render(smol):
    """A conversation with tool turns, with and without tools given: tool
    results and assistant calls (content missing, or empty; arguments a
    string or an object) all reach the prompt."""
    args = {"city": "Paris", "unit": "celsius"}
    convo = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": ASK["get_weather"]},
        {"role": "assistant", "tool_calls": [{
            "id": "call_0", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "21 C, sunny"},
        {"role": "assistant", "content": "It is 21 C and sunny in Paris."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": dict(args, city="Rome")}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "25 C, clear"},
    ]
    bare = chat(smol, SMOL, convo[:2], max_tokens=1)
    out = chat(smol, SMOL, convo, max_tokens=30)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"] + 40
    out = chat(smol, SMOL, convo, max_tokens=30, tools=TOOLS,
               chat_template_kwargs={"unused_flag": True})
    ch = out["choices"][0]
    check_auto(ch["message"], ch["finish_reason"])


def test_forced_calls_batched(smol):
    """Forced calls to different functions decoded in one batch (each under
    its own grammar) give the answers each gets alone."""
    import concurrent.futures as cf
    names = ["get_weather"] if slow_mode() else sorted(PARAMS)

    def one(name):
        out = chat(smol, SMOL, ASK[name], tools=TOOLS,
                   tool_choice=named(name), parallel_tool_calls=False)
        return forced(out)
    alone = [one(n) for n in names]
    with cf.ThreadPoolExecutor(len(names)) as ex:
        together = list(ex.map(one, names))
    assert together == alone
    assert [c[0][0] for c in alone] == names


def test_forced_call_cut_by_max_tokens(smol):
    """A forced call cut short by max_tokens: finish_reason "length", no
    half call in tool_calls."""
    out = chat(smol, SMOL, ASK["get_weather"], max_tokens=8, tools=TOOLS,
               tool_choice="required")
    ch = out["choices"][0]
    assert ch["finish_reason"] == "length", ch
    for c in ch["message"].get("tool_calls") or []:
        json.loads(c["function"]["arguments"])


def test_template_kwargs_and_foreign_tools_format(start_server, tmp_path):
    """A --chat-template file: chat_template_kwargs become its variables;
    a template that renders `tools` without the <tool_call> convention
    gets a 400 for tools (tern could not parse the calls back), unless
    tool_choice is "none"."""
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(
        "{%- if tools %}<|im_start|>system\nFunctions: {{ tools | tojson }}"
        "<|im_end|>\n{% endif %}"
        "{%- if persona %}<|im_start|>system\n{{ persona }}<|im_end|>\n"
        "{% endif %}"
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    srv = start_server("-m", model_path("smollm2-135m"), "-t", "2",
                       "--chat-template", str(tmpl))
    base = chat(srv, SMOL, "hi", max_tokens=1)["usage"]["prompt_tokens"]
    out = chat(srv, SMOL, "hi", max_tokens=1, chat_template_kwargs={
        "persona": "You are a pirate who answers in rhymes, always."})
    assert out["usage"]["prompt_tokens"] > base + 8, (base, out["usage"])
    for choice in ("auto", "required"):
        r = post(srv, {"model": SMOL, "max_tokens": 1, "tools": [W],
                       "tool_choice": choice,
                       "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "tools" and "<tool_call>" in err["message"], err
    out = chat(srv, SMOL, "hi", max_tokens=1, tools=[W], tool_choice="none")
    assert out["usage"]["prompt_tokens"] == base


@skip_slow
def test_gemma3_forced_call(start_server):
    """Gemma 3 270M (a base model) with tern's built-in gemma format: other
    turn markers, no tools section; tools written in by tern, a forced call
    comes back the same."""
    srv = start_server("-m", model_path("gemma3-270m"), "-t", "2",
                       "--ctx", "2048", "--chat-template", "gemma")
    out = chat(srv, "gemma-3-270m-Q4_K_M", ASK["get_weather"], tools=TOOLS,
               tool_choice=named("get_weather"), parallel_tool_calls=False)
    assert [n for n, _ in forced(out)] == ["get_weather"]


# ---- several calls, Qwen2.5-Coder 1.5B

@skip_slow
def test_parallel_calls_1_5b(qwen15):
    """Two cities: the bigger model calls twice (parallel_tool_calls
    defaults to true); the stream gives them as index 0 and 1."""
    q = "What's the weather in Paris and in Rome, in celsius?"
    out = chat(qwen15, QWEN15, q, max_tokens=90, tools=TOOLS,
               tool_choice="required")
    calls = forced(out)
    content, scalls, finish = reassemble(qwen15.client().chat.completions
                                         .create(model=QWEN15, tools=TOOLS,
                                                 tool_choice="required",
                                                 temperature=0, max_tokens=90,
                                                 stream=True, messages=[{
                                                     "role": "user",
                                                     "content": q}]))
    assert finish == "tool_calls" and content == ""
    assert check_calls(scalls) == calls
    assert len(calls) >= 2, f"expected a call per city: {calls}"
    out = chat(qwen15, QWEN15, "What is the weather like in Oslo right now?",
               tools=TOOLS, tool_choice="auto")
    ch = out["choices"][0]
    check_auto(ch["message"], ch["finish_reason"])


# ---- LangChain

@pytest.fixture(scope="module")
def lc_llm(qwen):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(base_url=qwen.base + "/v1", api_key="none",
                         model=QWEN, temperature=0, max_tokens=80,
                         max_retries=0, timeout=300)


@skip_slow
@pytest.mark.parametrize("choice", ["get_weather", "any"])
def test_langchain_bind_tools(lc_llm, choice):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: str = "celsius") -> str:
        """Get the current weather in a city."""
        return "sunny"

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    msg = lc_llm.bind_tools([get_weather, add], tool_choice=choice).invoke(
        "What's the weather in Paris?")
    assert msg.tool_calls, msg
    for tc in msg.tool_calls:
        assert tc["name"] in ("get_weather", "add"), tc
        assert isinstance(tc["args"], dict), tc
        assert CALL_ID.match(tc["id"]), tc
    if choice == "get_weather":
        assert msg.tool_calls[0]["name"] == "get_weather"
        assert isinstance(msg.tool_calls[0]["args"].get("city"), str)
    assert msg.response_metadata.get("finish_reason") == "tool_calls"


@skip_slow
@pytest.mark.parametrize("method", ["function_calling", "json_schema",
                                    "json_mode"])
def test_langchain_structured_output(lc_llm, method):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        """A city and the country it is in."""
        name: str = pydantic.Field(description="the city's name",
                                   max_length=30)
        country: str = pydantic.Field(description="the country",
                                      max_length=30)

    prompt = "Which city is the capital of France?"
    if method == "json_mode":
        prompt = ('Reply with a JSON object with the keys "name" (a city) '
                  'and "country". ' + prompt)
    out = lc_llm.with_structured_output(City, method=method).invoke(prompt)
    assert isinstance(out, City), out


# ---- bad input: 400s that name the field

BAD = {
    "tools not an array": (
        {"tools": {"get_weather": W}}, "tools", ["'tools'", "array"]),
    "type not function": (
        {"tools": [{"type": "code_interpreter"}]}, "tools[0]",
        ["type", "function"]),
    "name with a space": (
        {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
        "tools[0].function.name", ["name", "get weather"]),
    "name too long": (
        {"tools": [{"type": "function", "function": {"name": "f" * 65}}]},
        "tools[0].function.name", ["name", "64"]),
    "name missing": (
        {"tools": [{"type": "function", "function": {}}]},
        "tools[0].function.name", ["name"]),
    "duplicate name": (
        {"tools": [W, TOOLS[1], W]}, "tools[2].function.name",
        ["get_weather", "twice"]),
    "tool_choice without type": (
        {"tools": [W], "tool_choice": {"function": {"name": "get_weather"}}},
        "tool_choice", ["type", "function"]),
    "kwargs setting tools": (
        {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs",
        ["tools", "set by the server"]),
    "unsupported keyword": (
        {"tools": [W, {"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {
                "x": {"not": {"type": "string"}}}}}}]},
        "tools[1].function.parameters", ["'not'"]),
    "tool_choice unknown function": (
        {"tools": [W], "tool_choice": named("nope")}, "tool_choice",
        ["nope"]),
    "tool_choice bad string": (
        {"tools": [W], "tool_choice": "always"}, "tool_choice", ["always"]),
    "required without tools": (
        {"tool_choice": "required"}, "tool_choice", ["required", "tools"]),
    "named with response_format": (
        {"tools": [W], "tool_choice": named("get_weather"),
         "response_format": {"type": "json_object"}},
        "tool_choice", ["response_format"]),
    "required with json_schema": (
        {"tools": [W], "tool_choice": "required",
         "response_format": {"type": "json_schema", "json_schema": {
             "name": "x", "schema": {"type": "object"}}}},
        "tool_choice", ["response_format"]),
    "parallel_tool_calls not bool": (
        {"tools": [W], "parallel_tool_calls": "yes"}, "parallel_tool_calls",
        ["boolean"]),
    "chat_template_kwargs not an object": (
        {"chat_template_kwargs": ["x"]}, "chat_template_kwargs", ["object"]),
    "role function": (
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "function", "name": "f", "content": "1"}]},
        "messages[1].role", ["function", "tool"]),
    "tool_calls on a user message": (
        {"messages": [{"role": "user", "content": "hi", "tool_calls": [{
            "id": "c", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}]},
        "messages[0].tool_calls", ["assistant"]),
    "tool_calls without a name": (
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "tool_calls": [{
                          "id": "c", "type": "function",
                          "function": {"arguments": "{}"}}]}]},
        "messages[1].tool_calls[0]", ["name"]),
    "tool_call_id not a string": (
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "tool", "tool_call_id": 5, "content": "x"}]},
        "messages[1].tool_call_id", ["string"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tool_request(smol, case):
    extra, param, words = BAD[case]
    body = {"model": SMOL, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    r = post(smol, body)
    assert r.status_code == 400, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], (w, err)


def test_tools_on_completions(smol):
    for field, value in (("tools", [W]), ("tool_choice", "auto"),
                         ("parallel_tool_calls", False)):
        r = post(smol, {"model": SMOL, "prompt": "x", "max_tokens": 2,
                        field: value}, "/v1/completions")
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field, err
        assert "chat/completions" in err["message"], err


def test_parameters_not_an_object_param(smol):
    r = post(smol, {"model": SMOL, "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "function", "function": {
                        "name": "f", "parameters": [1]}}]})
    assert r.status_code == 400, r.text
    assert "parameters" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "tools[0].function.parameters"


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 10},
                                    {"type": "array", "maxItems": 3,
                                     "items": {"type": "integer"}}])
def test_non_object_parameters(smol, schema):
    """OpenAI refuses such a function (parameters must describe an object),
    and so does tern: a 400 naming the parameters."""
    r = post(smol, {"model": SMOL, "max_tokens": 60, "temperature": 0,
                    "messages": [{"role": "user", "content": "Call it."}],
                    "tools": [{"type": "function", "function": {
                        "name": "f", "parameters": schema}}],
                    "tool_choice": "required", "parallel_tool_calls": False})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools[0].function.parameters", err
    assert "object" in err["message"], err


def test_still_answers_after_bad_requests(smol):
    out = chat(smol, SMOL, "Say hi.", max_tokens=8)
    ch = out["choices"][0]
    assert ch["message"]["content"], ch
    assert ch["finish_reason"] in ("stop", "length")
    out = chat(smol, SMOL, ASK["get_weather"], tools=TOOLS,
               tool_choice="required", parallel_tool_calls=False)
    assert forced(out)

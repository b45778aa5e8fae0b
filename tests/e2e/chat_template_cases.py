"""Chat-template test material shared by tests/e2e/test_chat_templates.py
and tools/gen_template_fixtures.py: the reference renderer (Python jinja2 set
up exactly the way Hugging Face transformers renders chat templates), the
fixed clock, and the conversations every template is rendered with.

The reference renderer is a copy of transformers'
`transformers.utils.chat_template_utils._cached_compile_jinja_template`
(transformers 5.25.0; jinja2 3.1.6): an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks, the `{% generation %}` tag (AssistantTracker) and
loop controls, its own `tojson` filter (json.dumps: no HTML escaping,
ensure_ascii=False), `raise_exception`, `strftime_now`, a `dict` callable and
a `namespace` that refuses underscore names. transformers itself is not a
dependency of the test suite (it pulls in tokenizers, huggingface-hub, ...);
set TERN_JINJA_REF=transformers to render with the installed transformers'
own compile function instead, as a check that this copy still agrees.

The only deliberate difference: `strftime_now` reads a fixed clock (NOW,
UTC) instead of the wall clock, the same instant tern-render-template is
given with --now, so templates that print today's date compare equal.
"""
import copy
import datetime
import functools
import json
import os

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# 2025-03-05 09:07:08 UTC: a day and hour below 10, to exercise zero padding.
NOW = 1741165628

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"


def strftime_now(fmt):
    """transformers' strftime_now, on the fixed clock (UTC)."""
    return datetime.datetime.fromtimestamp(
        NOW, datetime.timezone.utc).strftime(fmt)


# ---- the reference environment (copy of transformers 5.25.0) -------------

class AssistantTracker(jinja2.ext.Extension):
    """The `{% generation %}...{% endgeneration %}` tag. transformers uses it
    to record where assistant text lands; for rendering it simply outputs
    its body, which is all that matters here."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"],
                                       drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"),
                                      [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None,
           sort_keys=False):
    # transformers overrides jinja2's tojson: no HTML escaping, and the
    # json.dumps options are exposed to templates.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


class TemplateDict:
    """`dict(...)` for templates, without dict's class attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes "
                f"on a namespace, but got {name!r}.")


def _make_env():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


_ENV = None


@functools.lru_cache(maxsize=None)
def compile_template(source):
    """The compiled template, as transformers would compile it. Raises
    (jinja2.TemplateSyntaxError, ...) where transformers would. Cached per
    source, like transformers' (compiling is the slow part)."""
    global _ENV
    if os.environ.get("TERN_JINJA_REF") == "transformers":
        from transformers.utils.chat_template_utils import (
            _compile_jinja_template)
        tpl = _compile_jinja_template(source)
        # Template globals chain to the environment's: swap in the clock.
        tpl.environment.globals["strftime_now"] = strftime_now
        return tpl
    if _ENV is None:
        _ENV = _make_env()
    return _ENV.from_string(source)


def render_reference(source, context):
    """(True, text) when jinja2 renders `source` with `context`, else
    (False, "ExceptionType: message"). Any exception counts as an error
    (TemplateError, TypeError from e.g. str + int, RecursionError, ...),
    since transformers' apply_chat_template would raise it too."""
    try:
        tpl = compile_template(source)
        # Each render gets its own copy, so a template cannot leak state
        # (e.g. through a mutable default) from one context into the next.
        return True, tpl.render(**copy.deepcopy(context))
    except Exception as e:  # noqa: BLE001 - any failure is "raises"
        return False, f"{type(e).__name__}: {e}"


# ---- conversations ---------------------------------------------------------

# Two functions in OpenAI / Hugging Face tool format. JSON-schema parameters
# with nested objects, arrays of objects, enums, a boolean default, and
# descriptions with double quotes, an apostrophe and non-ASCII text.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Get the current weather in a city. Use "celsius" '
                           "unless the user asks otherwise.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": 'City and country, e.g. "Paris, France"',
                    },
                    "unit": {
                        "type": "string",
                        "enum": ["celsius", "fahrenheit"],
                        "description": "The temperature unit",
                    },
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book a flight for one passenger. Returns the "
                           "booking's reference.",
            "parameters": {
                "type": "object",
                "properties": {
                    "passenger": {
                        "type": "object",
                        "description": "Who travels",
                        "properties": {
                            "name": {"type": "string"},
                            "age": {"type": "integer", "minimum": 0},
                            "seat": {"type": "string",
                                     "enum": ["window", "aisle", "middle"]},
                        },
                        "required": ["name"],
                    },
                    "legs": {
                        "type": "array",
                        "description": "Flights, in order",
                        "items": {
                            "type": "object",
                            "properties": {
                                "from": {"type": "string"},
                                "to": {"type": "string"},
                                "date": {"type": "string", "format": "date"},
                            },
                            "required": ["from", "to"],
                        },
                    },
                    "refundable": {"type": "boolean", "default": False},
                    "max_price": {"type": "number",
                                  "description": "Upper bound, in euros (€)"},
                },
                "required": ["passenger", "legs"],
            },
        },
    },
]

DOCUMENTS = [
    {"title": "Tern manual", "text": "tern serves GGUF models over an "
     "OpenAI-compatible HTTP API.\nStart it with `tern serve`."},
    {"title": "FAQ", "text": "Q: Does tern need Python?\nA: No."},
]

SYSTEM = "You are a helpful assistant."

# Tool-call ids are 9 alphanumeric characters: Mistral's templates insist.
CALL_1 = "a1b2c3d4e"
CALL_2 = "x9y8z7w6v"

# Each conversation: name, messages, and optionally tools, documents,
# extra template variables (extra) and bare=True (leave `tools` and
# `documents` out of the context instead of passing None as transformers
# does, to exercise templates' handling of undefined variables). Every one
# is rendered with add_generation_prompt true and false. Messages are
# already normalized the way transformers normalizes them (no None values).
CONVERSATIONS = [
    {
        "name": "single_user",
        "messages": [{"role": "user", "content": "Hello!"}],
    },
    {
        "name": "system_user",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
    },
    {
        "name": "multi_turn_no_system",
        "messages": [
            {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "I am an assistant."},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the chicken cross "
                                             "the road? To get to the "
                                             "other side."},
            {"role": "user", "content": "Another one, please."},
        ],
    },
    {
        # Non-ASCII text (accents, CJK, emoji, right-to-left, a combining
        # mark), leading/trailing whitespace and newlines (templates that
        # |trim must trim exactly Python's whitespace), quotes, backslashes
        # and Jinja-looking text that must stay literal.
        "name": "unicode_whitespace",
        "messages": [
            {"role": "system", "content": "  Réponds en français.\n\n"},
            {"role": "user", "content": "\n  Ça va ? 你好 🌍 مرحبا e\u0301\t"
                                        "\n\"quoted\" 'single' back\\slash "
                                        "{{ not_a_var }} {% raw %}\n\n"},
            {"role": "assistant", "content": "\n\nTrès bien, merci ! 😀  "
                                             "\r\n  "},
            {"role": "user", "content": "Zeile 1\nZeile 2\n\n\tEingerückt"
                                        " — fin.  "},
        ],
    },
    {
        # Tool calls with `arguments` as a dict, the form Hugging Face's
        # documentation uses, with content "", then the tool's answer and
        # a final assistant turn.
        "name": "tool_calls_dict_args",
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": CALL_1, "type": "function",
                 "function": {"name": "get_weather",
                              "arguments": {"location": "Paris, France",
                                            "unit": "celsius"}}}]},
            {"role": "tool", "tool_call_id": CALL_1, "name": "get_weather",
             "content": '{"temperature": 22, "condition": "sunny"}'},
            {"role": "assistant", "content": "It is 22 °C and sunny in "
                                             "Paris."},
        ],
    },
    {
        # The same without the assistant's content key, as after
        # transformers drops an OpenAI client's content=None (many
        # templates then raise on the undefined content), and a nested
        # dict argument.
        "name": "tool_call_no_content",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Book Ada on Paris-Rome."},
            {"role": "assistant", "tool_calls": [
                {"id": CALL_2, "type": "function",
                 "function": {"name": "book_flight",
                              "arguments": {
                                  "passenger": {"name": "Ada", "age": 36},
                                  "legs": [{"from": "CDG", "to": "FCO"}],
                                  "refundable": True}}}]},
            {"role": "tool", "tool_call_id": CALL_2, "name": "book_flight",
             "content": "booked: XK42"},
        ],
    },
    {
        # Two parallel tool calls with `arguments` as a JSON string (the
        # OpenAI wire format), content "", two tool answers, the assistant's
        # answer and a new user turn.
        "name": "tool_calls_string_args",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather in Paris and in London?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": CALL_1, "type": "function",
                 "function": {"name": "get_weather",
                              "arguments": '{"location": "Paris, France"}'}},
                {"id": CALL_2, "type": "function",
                 "function": {"name": "get_weather",
                              "arguments": '{"location": "London, UK", '
                                           '"unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": CALL_1, "name": "get_weather",
             "content": '{"temperature": 22}'},
            {"role": "tool", "tool_call_id": CALL_2, "name": "get_weather",
             "content": '{"temperature": 15}'},
            {"role": "assistant", "content": "Paris: 22 °C. London: 15 °C."},
            {"role": "user", "content": "Thanks! Book me a window seat "
                                        "from Paris to London."},
        ],
    },
    {
        "name": "tools_offered",
        "tools": TOOLS,
        # Fireworks' firefunction-v2 template reads these two instead of
        # `tools` (as its model card says to pass them); others ignore them.
        "extra": {"functions": json.dumps([t["function"] for t in TOOLS],
                                          indent=2),
                  "datetime": "2025-03-05"},
        "messages": [
            {"role": "system", "content": "You can call functions."},
            {"role": "user", "content": "Book a flight from Paris to Rome "
                                        "on 2025-04-01 for Ada, 36."},
        ],
    },
    {
        # A past assistant turn with its reasoning (under both names, as
        # transformers' _alias_reasoning_fields supplies them), and
        # enable_thinking=false for the templates that read it.
        "name": "reasoning_no_thinking",
        "extra": {"enable_thinking": False},
        "messages": [
            {"role": "user", "content": "What is 17 * 3?"},
            {"role": "assistant", "content": "17 * 3 = 51.",
             "reasoning_content": "17 * 3 = 51, easy.",
             "thinking": "17 * 3 = 51, easy."},
            {"role": "user", "content": "And 17 * 4?"},
        ],
    },
    {
        "name": "documents",
        "documents": DOCUMENTS,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "How do I start tern?"},
        ],
    },
    {
        # Content as a list of parts (the multimodal form, text only).
        "name": "content_parts",
        "messages": [
            {"role": "system", "content": [{"type": "text",
                                            "text": SYSTEM}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe this:"},
                {"type": "text", "text": "a list of parts."}]},
        ],
    },
    {
        # No `tools` or `documents` keys at all, as a caller other than
        # transformers might render (llama.cpp passes only what it has).
        "name": "bare_context",
        "bare": True,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Say goodbye."},
        ],
    },
]


def build_context(conv, add_generation_prompt):
    """The template variables for one render, as transformers'
    apply_chat_template passes them: messages, tools, documents,
    add_generation_prompt, the special tokens, then extra kwargs."""
    ctx = {"messages": conv["messages"]}
    if not conv.get("bare"):
        ctx["tools"] = conv.get("tools")
        ctx["documents"] = conv.get("documents")
    ctx["add_generation_prompt"] = add_generation_prompt
    ctx["bos_token"] = BOS_TOKEN
    ctx["eos_token"] = EOS_TOKEN
    ctx.update(conv.get("extra", {}))
    return ctx


def cases():
    """Every (case id, context) pair a template is rendered with."""
    out = []
    for conv in CONVERSATIONS:
        for agp in (False, True):
            out.append((f"{conv['name']}/agp={str(agp).lower()}",
                        build_context(conv, agp)))
    return out

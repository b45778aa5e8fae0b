#!/usr/bin/env python3
"""Writes the seed inputs of fuzz_tokenizer and fuzz_chat.

    .venv/bin/python tests/fuzz/make_seeds.py [--models models]

tests/fuzz/seeds/tokenizer/: one flags byte (see fuzz_tokenizer.c: vocabulary
slot, add_special, parse_special, render_special, detokenizer cap) and a text:
hand-picked hard cases plus strings from the tokenizer fixtures.

tests/fuzz/seeds/chat/: one flags byte (see fuzz_chat.c), a chat template,
then messages "RS role US content". The templates are the real ones: from
the GGUF files under --models when the `gguf` package and the files are
there (SmolLM2, Qwen2.5), from tests/fixtures/tokenizer/templates.json
(Qwen2.5, Llama 3.1/3.3, the original Llama 3), and a Gemma 3 template
written after Google's published one (our Gemma 3 GGUF ships none).

The output is deterministic; rerunning rewrites the same files.
"""
import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RS, US = b"\x1e", b"\x1f"

GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if "
    "loop.first else \"\") }}\n"
    "    {{ message['content'] | trim }}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

TOKENIZER_TEXTS = [
    b"Hello world! How are you?",
    b"def f(x):\n    return x**2  # square\n\tif (a != b) { return; }\n",
    b"1234567890 3.14159 1,000,000 2024-01-01 0x1F 1e-9",
    b"I'm you're it's we'll they've don't I'D WE'RE",
    "naïve café Zürich — “quotes” 日本語のテキスト 中文 한국어 Ελληνικά "
    "Русский текст עברית العربية".encode(),
    "👍🏽 🇫🇷 👨‍👩‍👧 ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢".encode(),
    b"   leading\n\n\n  trailing   \t\t\r\n  ",
    b"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    b"<start_of_turn>user\nhi<end_of_turn>\n<bos><eos><pad><unk>",
    b"<|endoftext|><|endoftext|>text<|endoftext",
    b"<0x0A><0xFF><0x00>",
    "▁▁hello▁world ▁".encode(),
    b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x82\xf0\x90\x80 invalid",
    b"a\x00b\x00\x01\x02\x04\x06\x13\x14\x16\x1d\x1b[31m",
    b"\xed\xa0\x80\xed\xbf\xbf surrogates \xc0\xaf overlong",
    b"a" * 600,
    b" " * 300 + b"x",
    b"ab" * 200,
    b"\n" * 100,
    "ǅ ﬁ ß ẞ İ ı Σσς".encode(),
    "\u00a0\u2028\u3000\u200b\ufeff zero width".encode(),
    b"<|im_start|><|im_sta<|im_end|>|>",
]

# flags: slot (0 SmolLM2, 1 Gemma 3, 2 Qwen2.5), add_special 4,
# parse_special 8, render_special 16, cap mode << 5
TOKENIZER_FLAGS = [0x00, 0x0C, 0x01, 0x0D, 0x02, 0x0E, 0x1C | 0x20, 0x1D | 0xE0]


def gguf_template(path):
    try:
        import gguf  # noqa: the venv's gguf package
    except ImportError:
        return None
    if not os.path.exists(path):
        return None
    r = gguf.GGUFReader(path)
    f = r.fields.get("tokenizer.chat_template")
    if f is None:
        return None
    return bytes(f.parts[f.data[0]])


def write(dirname, data, name=None):
    os.makedirs(dirname, exist_ok=True)
    name = name or hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(dirname, name), "wb") as f:
        f.write(data)


def tokenizer_seeds(out):
    n = 0
    for i, text in enumerate(TOKENIZER_TEXTS):
        for k, fl in enumerate(TOKENIZER_FLAGS):
            if (i + k) % 3 and k > 2:  # every text on every vocabulary,
                continue              # the odd flags on a third of them
            write(out, bytes([fl]) + text)
            n += 1
    # fixture strings, round-robin over the vocabularies
    for name, slot in (("smollm2", 0), ("gemma3", 1)):
        path = os.path.join(ROOT, "tests/fixtures/tokenizer", name + ".jsonl")
        if not os.path.exists(path):
            continue
        lines = [l for l in open(path, encoding="utf-8").read().split("\n") if l]
        for j, line in enumerate(lines[::10]):
            rec = json.loads(line)
            if "text" in rec:
                text = rec["text"].encode("utf-8", "surrogatepass")
            else:
                text = bytes.fromhex(rec["hex"])
            write(out, bytes([slot | (8 if j % 2 else 0)]) + text)
            n += 1
    return n


CONVERSATIONS = [
    [("user", b"Hello!")],
    [("system", b"You are terse."), ("user", b"What is 2+2?"),
     ("assistant", b"4"), ("user", b"And 3+3?")],
    [("user", b"  padded  \n"), ("assistant", "\u3000wide\u00a0".encode())],
    [("user", b"one"), ("user", b"two")],            # gemma refuses
    [("assistant", b"I speak first")],
    [("system", b"only a system message")],
    [("user", b"nul\x00inside"), ("assistant", b"")],
    [("user", None), ("assistant", None)],            # no content at all
    [("tool", b"{\"result\": 42}"), ("ipython", b"print(1)")],
    [("\xff\xfe".encode("latin-1"), b"weird role"), ("", b"empty role")],
    [],
]


def chat_input(flags, template, conv):
    b = bytes([flags]) + template
    for role, content in conv:
        b += RS + role.encode("latin-1") if isinstance(role, str) else RS + role
        if content is not None:
            b += US + content
    return b


def chat_seeds(out, models):
    templates = []
    smol = gguf_template(os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if smol:
        templates.append(smol)
    qwen = gguf_template(
        os.path.join(models, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    if qwen:
        templates.append(qwen)
    fx = os.path.join(ROOT, "tests/fixtures/tokenizer/templates.json")
    if os.path.exists(fx):
        for fam in json.load(open(fx, encoding="utf-8")):
            t = fam["template"].encode()
            if t not in templates:
                templates.append(t)
    templates.append(GEMMA3_TEMPLATE.encode())
    templates.append(b"{{ messages }} unknown family")
    n = 0
    for ti, t in enumerate(templates):
        for ci, conv in enumerate(CONVERSATIONS):
            if (ti + ci) % 2 and ci > 1:
                continue
            # template key present; add_bos and a bos id vary; bit 6 SPM
            flags = 0x01 | ((ci & 1) << 1) | 0x04 | ((ti & 1) << 3)
            flags |= 0x40 if ci % 3 == 2 else 0
            flags |= 0x80 if ci % 2 else 0
            write(out, chat_input(flags, t, conv))
            n += 1
    # no template in the GGUF: a family chosen by name, or a bad name;
    # with and without the family's tokens
    for name, leave in ((b"chatml", 0), (b"gemma", 0), (b"llama3", 0),
                        (b"gemma", 2), (b"nope", 0), (b"", 0)):
        write(out, chat_input(0x06 | (leave << 4), name, CONVERSATIONS[1]))
        n += 1
    # a template that names a family whose tokens the vocabulary lacks
    write(out, chat_input(0x01 | (1 << 4), templates[0], CONVERSATIONS[0]))
    return n + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=os.path.join(ROOT, "models"))
    a = ap.parse_args()
    n = tokenizer_seeds(os.path.join(HERE, "seeds/tokenizer"))
    m = chat_seeds(os.path.join(HERE, "seeds/chat"), a.models)
    print(f"seeds: {n} tokenizer, {m} chat", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Generates the tokenizer fixtures under tests/fixtures/tokenizer/.

  <model>.jsonl       one line per corpus string: {"text": ...} or
                      {"hex": ...} (bytes that are not UTF-8), and "ids":
                      llama.cpp's tokenization with add_special=true and
                      parse_special=true (what `llama-tokenize` does by
                      default); null where llama.cpp fails (it throws on
                      a 4-byte sequence above U+10FFFF).
  <model>.chat.jsonl  one line per conversation: {"messages": [...],
                      "add_generation_prompt": bool, "text": ...}, the
                      model's chat template rendered by jinja2.
  templates.json      other families' real templates (Qwen2.5, Llama 3.x,
                      from llama.cpp's models/templates) with conversations
                      rendered by jinja2, for the synthetic-vocab tests.

Reference ids come from llama.cpp's llama-tokenize (built from the
llama-cpp-python sdist into ref/bin by tools/build_llamacpp.sh):

  llama-tokenize -m MODEL --stdin --ids --no-escape --log-disable

Usage: tools/gen_tokenizer_fixtures.py [--llama-tokenize PATH] [--out DIR]
Needs: gguf, jinja2 (pip install gguf jinja2).

BOS in rendered chats: Gemma 3's and Llama 3's templates start with
bos_token; when the tokenizer adds BOS itself (add_bos_token true) the
leading BOS text is stripped, as tern's tn_chat_format does (and llama.cpp's
server), so that encoding with add_special gives one BOS.
"""
import argparse
import json
import os
import subprocess
import sys

import jinja2
import jinja2.sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "smollm2": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "models/gemma-3-270m-Q4_K_M.gguf",
}
LLAMACPP_TEMPLATES = "ref/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates"

# Gemma 3's tokenizer_config.json chat_template (the GGUF carries none).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# The original Llama 3 (8B Instruct) template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def corpus():
    """The strings: (text or bytes)."""
    c = [
        "", " ", "  ", "\n", "\n\n", "\t", "Hello", "Hello world",
        "hello world", "HELLO WORLD", " Hello", "  Hello", "Hello ", "Hello  ",
        "The quick brown fox jumps over the lazy dog.",
        "It's a test; isn't it? They'll see, we've won, I'm here, you'd go.",
        "IT'S LOUD, DON'T SHOUT, WE'LL SEE, THEY'VE GONE, I'M OUT, YOU'D KNOW",
        "'s 't 're 've 'm 'll 'd",
        "O'Neil's dog's bone", "rock 'n' roll", "''quoted''", "it’s curly",
        "don't", "Don'T", "can't won't shan't",
        # whitespace
        "a b", "a  b", "a   b", "a    b", "a\tb", "a\t\tb", "a\nb", "a\n\nb",
        "a\r\nb", "a \n b", "a\n \nb", "  leading", "trailing  ", "   ",
        "\t\t\t", "\n\n\n\n", " \n", "\n ", " \t \n ", "line1\nline2\n",
        "x\u00a0y", "x\u3000y", "x\u2009y", "x\u2028y", "x\u0085y",
        "x\u180ey", "x\u200by", "\ufeffBOM", "a\u200fb", "\r", "\r\r\n",
        "\x0b\x0c", "word     \n     word",
        "    def indented():\n        return 1\n",
        # digits
        "1", "12", "123", "1234", "12345", "123456789", "3.14159265358979",
        "1,000,000", "1 000 000", "v1.2.3", "2024-01-15T10:30:00Z",
        "12345678901234567890123456789012345678901234567890",
        "The year 1999 and 2000.", "0x1F600", "1e-10", "-42", "+7",
        "\u0663\u0664\u0665", "\u2460\u2461\u2462", "\u216b", "\uff11\uff12\uff13",
        "\u0967\u0968\u0969", "a1b2c3", "route66", "3rd 2nd 1st",
        # punctuation and symbols
        "!!!???...", "----", "====", "$$$", "@#%^&*", "(){}[]<>",
        "\u201csmart\u201d \u2018quotes\u2019", "em\u2014dash en\u2013dash",
        "wait\u2026", "\u2211\u222b\u221a\u221e \u2260 \u2264", "\u20ac\u00a3\u00a5\u20b9 100",
        "\u00a9\u00ae\u2122", "~`|\\^_", "a.b,c;d:e", "http://example.com/a?b=c&d=e#f",
        "user@example.com", "C:\\Windows\\System32", "#hashtag @mention",
        # code
        "int main(void) {\n  printf(\"hi\\n\");\n  return 0;\n}\n",
        "def f(x):\n    return x ** 2  # square\n",
        "for (let i = 0; i < n; i++) { sum += a[i]; }",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
        "<div class=\"x\"><p>Hello</p></div>",
        "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
        "fn main() { let v: Vec<u8> = vec![1, 2]; println!(\"{:?}\", v); }",
        "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | grep -q x && exit 1\n",
        "x = [i*i for i in range(10) if i % 2 == 0]",
        "if (a && b || !c) { x >>= 2; y <<= 3; z ^= ~w; }",
        "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n",
        "std::vector<std::string> v{\"a\", \"b\"};",
        "// comment\n/* block */\n#define MAX(a,b) ((a)>(b)?(a):(b))",
        "\tif x:\n\t\tpass\n", "a=>b->c::d", "```python\nprint('hi')\n```",
        # scripts
        "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
        "\u3072\u3089\u304c\u306a \u30ab\u30bf\u30ab\u30ca \u6f22\u5b57",
        "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
        "\u0627\u0644\u0644\u063a\u0629 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u062c\u0645\u064a\u0644\u0629",
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
        "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e \u092e\u0947\u0902 \u0932\u093f\u0916\u093e \u0917\u092f\u093e \u0935\u093e\u0915\u094d\u092f",
        "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
        "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22\u0e44\u0e21\u0e48\u0e21\u0e35\u0e0a\u0e48\u0e2d\u0e07\u0e27\u0e48\u0e32\u0e07",
        "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
        "\u0394\u03b5\u03bd \u03ba\u03b1\u03c4\u03b1\u03bb\u03b1\u03b2\u03b1\u03af\u03bd\u03c9",
        "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0",
        "\u0532\u0561\u0580\u0565\u0582", "\u09ac\u09be\u0982\u09b2\u09be \u09ad\u09be\u09b7\u09be",
        "\u0ba4\u0bae\u0bbf\u0bb4\u0bcd", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u",
        "T\u00fcrk\u00e7e \u0130stanbul \u0131\u015f\u0131k", "\u12a0\u121b\u122d\u129b",
        "Stra\u00dfe \u00fcber \u00c4pfel", "fran\u00e7ais \u00e9l\u00e8ve na\u00efve",
        "\u0d2e\u0d32\u0d2f\u0d3e\u0d33\u0d02", "\u0c24\u0c46\u0c32\u0c41\u0c17\u0c41",
        "\u1019\u103c\u1014\u103a\u1019\u102c", "\u0f56\u0f7c\u0f51\u0f0b\u0f61\u0f72\u0f42",
        "\u1780\u17d2\u1798\u17c2\u179a", "mixed English \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940",
        "\ud840\udc00\ud840\udc01",  # CJK extension B (surrogate-escaped here)
        # emoji
        "\U0001f600", "\U0001f642 smile", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
        "\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5", "\U0001f44d\U0001f3fd", "1\ufe0f\u20e3",
        "\U0001f3f3\ufe0f\u200d\U0001f308", "\u2764\ufe0f", "\U0001f9d1\u200d\U0001f4bb",
        "\U0001f469\U0001f3fe\u200d\U0001f52c", "emoji\U0001f680in\U0001f525text",
        "\U0001f600\U0001f600\U0001f600\U0001f600",
        # combining marks
        "e\u0301", "cafe\u0301", "n\u0303", "Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312\u036bg\u030c\u0317\u031a\u035ao\u0319\u0314\u036e\u0307\u0350\u0307",
        "\u1100\u1161\u11a8", "a\u0300\u0301\u0302\u0303", "\u0915\u094d\u0937",
        "\u05e9\u05c1\u05b8", "\u0627\u064e\u0644\u0652",
        # special-token text
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n",
        "<|im_start|>assistant\n", "<|im_start", "im_start|>", "<|im_start|><|im_end|>",
        "x<|im_end|>y", " <|im_start|> ", "<start_of_turn>", "<end_of_turn>",
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
        "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>", "<unused99>",
        "[multimodal]", "<|eot_id|>", "<s></s>", "<repo_name>", "<file_sep>x",
        "<jupyter_code>print(1)", "<<|im_end|>>", "<|im_end|><|im_end|>",
        "<start_of_image>", "<end_of_turn><eos>",
        # long
        "a" * 1000, "supercalifragilisticexpialidocious" * 20, "ab" * 500,
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCB0ZXh0IGZvciB0ZXN0aW5n" * 4,
        "https://example.com/" + "path/" * 50 + "?q=" + "x" * 100,
        " " * 100, "\n" * 50, "\t" * 30, "1" * 300, "!" * 200,
        "\u4e00" * 200, "\U0001f600" * 50, "word " * 200,
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
        "tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, "
        "quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.",
        # control characters
        "\x00", "a\x00b", "\x01\x02\x03", "\x7f", "\x1b[31mred\x1b[0m", "\x08\x07",
        "\u2581", "\u2581\u2581x", "a\u2581b",
        # mixed odds and ends
        "Mr. Smith's 3 cats (and 2 dogs) cost $1,234.56!",
        "E=mc\u00b2 and H\u2082O", "\u00bd \u00bc \u00be", "x\u00b2 + y\u00b3",
        "\u2160\u2161\u2162", "\u0130\u0131 \u00df\u1e9e", "\u01c5\u01c8",
        "\uff21\uff22\uff23 \uff41\uff42\uff43", "\u3000\u3001\u3002",
        "Q: What's 2+2?\nA: 4.", "User: hi\nAssistant: hello\n",
        "tab\tseparated\tvalues\n1\t2\t3", "CSV,data,\"quoted,comma\"\n",
        "    ", "\n\n\n", " \u00a0 ", "a\u00a0\u00a0b", "\u3000\u3000",
    ]
    # invalid UTF-8 byte strings
    b = [
        b"\xff", b"\xc3", b"abc\x80def", b"\xe3\x81", b"\xc0\xaf", b"\xed\xa0\x80",
        b"\xe6\x97\xa5\xe6\x9c", b"\xf4\x90\x80\x80", b"a\xfe\xffb", b"\x80\x80\x80",
    ]
    out = []
    for s in c:
        # the CJK extension B entry above is written with surrogates: fold
        s = s.encode("utf-16", "surrogatepass").decode("utf-16")
        out.append(s.encode("utf-8"))
    out.extend(b)
    # de-duplicate, keep order
    seen, res = set(), []
    for x in out:
        if x not in seen:
            seen.add(x)
            res.append(x)
    return res


def llama_tokenize(exe, model, data):
    r = subprocess.run(
        [exe, "-m", model, "--stdin", "--ids", "--no-escape", "--log-disable"],
        input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    line = r.stdout.decode().strip().splitlines()[-1]
    return json.loads(line)


def gguf_meta(path):
    import gguf
    r = gguf.GGUFReader(path)

    def s(key):
        f = r.fields.get(key)
        if f is None:
            return None
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    def scalar(key):
        f = r.fields.get(key)
        return None if f is None else f.parts[f.data[0]][0]

    toks = r.fields["tokenizer.ggml.tokens"]
    bos = scalar("tokenizer.ggml.bos_token_id")
    bos_text = bytes(toks.parts[toks.data[int(bos)]]).decode() if bos is not None else ""
    return {
        "template": s("tokenizer.chat_template"),
        "bos": bos_text,
        "add_bos": bool(scalar("tokenizer.ggml.add_bos_token")),
    }


CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "user", "content": "Hello!"}], False),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "system", "content": "Be kind."},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], True),
    ([{"role": "user", "content": "  padded question \n"},
      {"role": "assistant", "content": "\nanswer with spaces  "},
      {"role": "user", "content": "again"}], True),
    ([{"role": "user", "content": "Unicode: \u65e5\u672c\u8a9e \U0001f600"},
      {"role": "assistant", "content": "Sure."}], False),
    ([{"role": "system", "content": "Multi\nline\nsystem"},
      {"role": "user", "content": "x"},
      {"role": "assistant", "content": "y"}], True),
    ([{"role": "user", "content": ""}], True),
]


def render(template, bos, add_bos, msgs, agp, eos=""):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True)

    def raise_exception(m):
        raise jinja2.exceptions.TemplateError(m)

    env.globals["raise_exception"] = raise_exception
    out = env.from_string(template).render(
        messages=msgs, add_generation_prompt=agp, bos_token=bos,
        eos_token=eos)
    if add_bos and bos and out.startswith(bos):
        out = out[len(bos):]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-tokenize",
                    default=os.path.join(ROOT, "ref/bin/llama-tokenize"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tokenizer"))
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--skip-ids", action="store_true",
                    help="only (re)write the chat fixtures")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    texts = corpus()
    print(f"corpus: {len(texts)} strings", file=sys.stderr)

    for name, rel in MODELS.items():
        if name not in a.models.split(","):
            continue
        path = os.path.join(ROOT, rel)
        meta = gguf_meta(path)
        if not a.skip_ids:
            with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
                for t in texts:
                    try:
                        ids = llama_tokenize(a.llama_tokenize, path, t)
                    except subprocess.CalledProcessError as e:
                        # llama.cpp throws on some broken UTF-8 (a 4-byte
                        # sequence above U+10FFFF): no reference then
                        if b"invalid codepoint" not in e.stderr:
                            raise
                        print(f"{name}: llama-tokenize failed for {t!r}: "
                              f"{e.stderr.decode(errors='replace').strip()[-80:]}",
                              file=sys.stderr)
                        ids = None
                    try:
                        rec = {"text": t.decode("utf-8")}
                    except UnicodeDecodeError:
                        rec = {"hex": t.hex()}
                    rec["ids"] = ids
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        tmpl = meta["template"] or (GEMMA3_TEMPLATE if name == "gemma3" else None)
        with open(os.path.join(a.out, f"{name}.chat.jsonl"), "w") as f:
            for msgs, agp in CONVERSATIONS:
                try:
                    text = render(tmpl, meta["bos"], meta["add_bos"], msgs, agp)
                except jinja2.exceptions.TemplateError:
                    continue
                f.write(json.dumps({"messages": msgs,
                                    "add_generation_prompt": agp,
                                    "text": text}, ensure_ascii=False) + "\n")

    # other families, checked with synthetic vocabularies in the C test
    fams = []
    tdir = os.path.join(ROOT, LLAMACPP_TEMPLATES)
    for fname, bos, family in [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "chatml"),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "llama3"),
        ("meta-llama-Llama-3.3-70B-Instruct.jinja", "<|begin_of_text|>", "llama3"),
        (None, "<|begin_of_text|>", "llama3"),
    ]:
        tmpl = open(os.path.join(tdir, fname)).read() if fname else LLAMA3_TEMPLATE
        cases = []
        for msgs, agp in CONVERSATIONS:
            text = render(tmpl, bos, True, msgs, agp)
            cases.append({"messages": msgs, "add_generation_prompt": agp,
                          "text": text})
        fams.append({"name": fname or "llama3-original", "family": family,
                     "bos": bos, "template": tmpl, "cases": cases})
    with open(os.path.join(a.out, "templates.json"), "w") as f:
        json.dump(fams, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()

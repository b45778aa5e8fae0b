"""Token masks against a reference engine: for every schema of a corpus
(ordinary, nested, recursive and hostile ones), tern's set of allowed tokens
equals llguidance's on the same vocabulary and the same grammar (tern's GBNF
for the schema, given to llguidance through its own GBNF-to-Lark
converter), at every step of randomly sampled outputs. A second check runs
the sampled outputs through the schema: every finished one validates.

tern's masks come from tests/helpers/grammar_masks.c (tern-grammar-masks,
built next to tern)."""
import json
import os
import pathlib
import random
import subprocess

import jsonschema
import pytest

from conftest import ROOT, model_path, slow_mode

llguidance = pytest.importorskip("llguidance")
from llguidance.gbnf_to_lark import gbnf_to_lark  # noqa: E402


def _corpus():
    s = []
    prim = [{"type": "string"}, {"type": "integer"}, {"type": "number"},
            {"type": "boolean"}, {"type": "null"}]
    for p in prim:
        s.append(p)
        s.append({"type": "object", "properties": {"v": p}, "required": ["v"]})
        s.append({"type": "array", "items": p, "maxItems": 4})
    s += [
        {"type": "string", "minLength": 3, "maxLength": 6},
        {"type": "string", "format": "date"},
        {"type": "string", "format": "time"},
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "uuid"},
        {"type": "string", "pattern": "^[A-Z]{2}-\\d{3,5}$"},
        {"type": "string", "pattern": "ab+c"},
        {"type": "string", "pattern": "^(\"|\\\\|x)+$"},
        {"type": "integer", "minimum": -20, "maximum": 20},
        {"type": "integer", "minimum": 1000},
        {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
        {"type": "integer", "maximum": -7},
        {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "number", "minimum": -2.5, "exclusiveMaximum": 0.75},
        {"type": "object", "properties": {"p": {
            "type": "number", "exclusiveMinimum": 0.1, "maximum": 0.35}},
         "required": ["p"]},
        {"type": "object", "properties": {"score": {
            "type": "number", "exclusiveMinimum": -5, "maximum": 5}},
         "required": ["score"]},
        {"enum": ["red", "green", "blue", 1, 2.5, None, True]},
        {"enum": [f"item-{i}" for i in range(1000)]},
        {"const": {"fixed": [1, 2, {"x": "y"}]}},
        {"type": ["string", "integer", "null"]},
        {"anyOf": [{"type": "integer"}, {"type": "array",
                                          "items": {"type": "string"}}]},
        {"oneOf": [{"const": "a"}, {"type": "object",
                                    "properties": {"b": {"type": "integer"}}}]},
        {"allOf": [{"type": "string", "maxLength": 2}]},
        {"type": "object"},
        {"type": "object", "additionalProperties": {"type": "boolean"}},
        {"type": "object", "properties": {"a": {"type": "string"}},
         "additionalProperties": True},
        {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "string"},
            "c": {"type": "boolean"}, "d": {"type": "null"}},
         "required": ["b", "d"]},
        {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "zip": {
                    "type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"]},
            "tags": {"type": "array", "items": {"type": "string"},
                     "minItems": 1, "maxItems": 3}},
         "required": ["name", "address", "tags"]},
        {"type": "array", "prefixItems": [{"type": "integer"},
                                          {"type": "string"}],
         "items": {"type": "boolean"}, "maxItems": 4},
        {"type": "array", "items": {"type": "integer"}, "minItems": 2,
         "maxItems": 2},
        {"$defs": {"t": {"type": "object", "properties": {
            "v": {"type": "integer"}, "kids": {"type": "array",
                                             "items": {"$ref": "#/$defs/t"}}},
            "required": ["v"]}}, "$ref": "#/$defs/t"},
        {"definitions": {"s": {"type": "string", "maxLength": 3}},
         "type": "object", "properties": {"x": {"$ref": "#/definitions/s"},
                                          "y": {"$ref": "#/definitions/s"}}},
        {"type": "object", "properties": {"n": {"type": "string",
                                                "nullable": True}}},
        {"type": "object", "properties": {
            "k\"ey": {"type": "string"}, "ключ": {"type": "integer"},
            "emoji 😀": {"const": "é"}}, "required": ["k\"ey"]},
        {"enum": ["日本", "日本語", "中文", "español", "a\nb"]},
        {"type": "string", "pattern": "^[^a-z]{0,3}(\\.|é){1,2}\\w$"},
        {"type": "array", "items": {"anyOf": [
            {"type": "object", "properties": {"t": {"const": "x"}},
             "required": ["t"]},
            {"type": "object", "properties": {"t": {"const": "y"},
                                              "n": {"type": "number"}},
             "required": ["t", "n"]}]}, "maxItems": 3},
    ]
    # deep nesting
    deep = {"type": "integer"}
    for _ in range(30):
        deep = {"type": "array", "items": deep, "maxItems": 1}
    s.append(deep)
    obj = {"type": "string"}
    for i in range(20):
        obj = {"type": "object", "properties": {f"k{i}": obj},
               "required": [f"k{i}"]}
    s.append(obj)
    # many properties
    s.append({"type": "object", "properties": {
        f"field_{i}": {"type": ["integer", "string"]} for i in range(60)}})
    return s


SCHEMAS = _corpus()


def helper():
    tern = os.environ.get("TERN_BIN", str(ROOT / "build" / "tern"))
    p = pathlib.Path(tern).parent / "tern-grammar-masks"
    if not p.exists():
        pytest.fail(f"{p} missing (it is built with tern)")
    return str(p)


@pytest.fixture(scope="module")
def vocab():
    model = model_path("smollm2-135m")
    out = subprocess.run([helper(), "vocab", model], capture_output=True,
                         check=True, timeout=120)
    v = json.loads(out.stdout)
    toks = [bytes.fromhex(t) for t in v["tokens"]]
    special = set(v["special"]) | set(v["eog"])
    index = {}
    for i, t in enumerate(toks):
        if t and i not in special:
            index.setdefault(t, i)
    maxlen = max(len(t) for t in toks)

    class Tok:
        eos_token_id = v["eog"][0]
        bos_token_id = v["bos"] if v["bos"] >= 0 else None
        tokens = toks
        special_token_ids = sorted(special)

        def __call__(self, b):
            # longest match: llguidance only uses it for forced text
            if isinstance(b, str):
                b = b.encode()
            out, i = [], 0
            while i < len(b):
                for j in range(min(len(b), i + maxlen), i, -1):
                    t = index.get(b[i:j])
                    if t is not None:
                        out.append(t)
                        i = j
                        break
                else:
                    i += 1
            return out

    lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tok()),
                                eos_token=v["eog"], slices=[])
    return model, lt, v, special, toks


def test_corpus_size():
    assert len(SCHEMAS) >= 50


def ll_allowed(m, n_vocab):
    bm = m.compute_bitmask()
    x = int.from_bytes(bm, "little")
    return {i for i in range(n_vocab) if (x >> i) & 1}


@pytest.mark.parametrize("idx", range(len(SCHEMAS)))
def test_masks_equal_llguidance(vocab, tmp_path, idx):
    if slow_mode() and idx % 6:
        # under the sanitizers a sixth of the corpus: this checks equality
        # with the reference, which the release run covers in full
        pytest.skip("sanitizer run: every sixth schema")
    model, lt, v, special, toks = vocab
    n_vocab = v["n_vocab"]
    schema = SCHEMAS[idx]
    sp = tmp_path / "s.json"
    sp.write_text(json.dumps(schema))
    g = subprocess.run([helper(), "gbnf", str(sp)], capture_output=True,
                       text=True, timeout=60)
    assert g.returncode == 0, g.stdout + g.stderr
    gp = tmp_path / "g.gbnf"
    gp.write_text(g.stdout)
    m = llguidance.LLMatcher(lt, gbnf_to_lark(g.stdout), log_level=0)
    assert not m.is_error(), m.get_error()
    proc = subprocess.Popen([helper(), "masks", model, str(gp)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    rng = random.Random(idx)
    steps = 12 if slow_mode() else 40
    text = b""
    try:
        for step in range(steps):
            line = proc.stdout.readline().strip()
            assert not line.startswith("error"), line
            x = int(line, 16)
            ours = {i for i in range(n_vocab) if (x >> i) & 1}
            ref = ll_allowed(m, n_vocab)
            # special tokens other than end-of-generation are never in a
            # grammar's output
            ref = {i for i in ref if i not in special or i in v["eog"]}
            # Where the grammar forces the next bytes, llguidance allows
            # only the tokens of their canonical tokenization; tern allows
            # every token that spells a prefix of them (as llama.cpp and
            # xgrammar do). There llguidance's set must be inside ours.
            forced = m.compute_ff_bytes()
            if forced and ref <= ours and all(
                    forced.startswith(toks[i]) or toks[i].startswith(forced)
                    for i in ours - ref):
                ref = ours
            if ours != ref:
                extra = sorted(ours - ref)[:5]
                missing = sorted(ref - ours)[:5]
                pytest.fail(
                    f"step {step} after {text!r}: tern allows "
                    f"{[lt.decode_bytes([i]) for i in extra]} that llguidance "
                    f"does not; misses {[lt.decode_bytes([i]) for i in missing]}")
            choices = sorted(ours)
            if not choices:
                break
            # bias the walk towards ending so outputs finish
            eog = [i for i in choices if i in v["eog"]]
            pick = eog[0] if eog and rng.random() < 0.5 else rng.choice(choices)
            if pick in v["eog"]:
                assert m.is_accepting()
                jsonschema.validate(json.loads(text.decode()), schema)
                break
            assert m.consume_token(pick), m.get_error()
            proc.stdin.write(f"{pick}\n")
            proc.stdin.flush()
            text += lt.decode_bytes([pick])
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)

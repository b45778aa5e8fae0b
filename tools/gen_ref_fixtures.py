#!/usr/bin/env python3
"""Generate llama.cpp reference fixtures under tests/fixtures/ref/<model>/.

    tools/build_llamacpp.sh                       # once: builds ref/
    build/tern pull --dir models smollm2-135m gemma3-270m  # once: models/
    /tmp/venv/bin/python tools/gen_ref_fixtures.py [MODEL ...] [--only logits,greedy,ppl]

Needs numpy and the reference build in <repo>/ref/ (override with --ref):
  ref/lib/libllama.so            (loaded through the ctypes bindings of the
  ref/llama_cpp_python-*/llama_cpp  llama-cpp-python sdist, LLAMA_CPP_LIB_PATH)
  ref/bin/llama-perplexity

Writes, per model:
  logits.json      prompt token ids + last-position top-64 logits + stats
  greedy.json      greedy 64-token continuations
  logits_ub1.json, greedy_ub1.json
                   the same with the prompt fed one token at a time
  perplexity.json  llama-perplexity final PPL on tests/fixtures/ref/ppl.txt
The exact schemas are described in tests/fixtures/ref/README.md.
"""
import argparse
import ctypes
import glob
import importlib
import json
import math
import os
import re
import subprocess
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "ref")

MODELS = {
    "smollm2-135m": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "chat": "chatml"},
    "gemma3-270m": {"file": "gemma-3-270m-Q4_K_M.gguf", "chat": "gemma"},
    "qwen2.5-coder-0.5b": {"file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "chat": "chatml"},
    "qwen2.5-coder-1.5b": {"file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "chat": "chatml"},
}

CHAT = {
    "chatml": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "gemma": ("<start_of_turn>user\nWhat is the capital of France? Answer in one word.<end_of_turn>\n"
              "<start_of_turn>model\n"),
}

LONG = ("The lighthouse on the northern cape was built in the spring of a dry year, when the "
        "farmers in the valley had little to do but wait for rain. Stone was cut from the quarry "
        "above the village and carried down the hill on wooden sledges pulled by oxen. The master "
        "mason was a quiet man who spoke only when a wall was out of true, and the young workers "
        "soon learned to read his silences as carefully as his words. By the end of the summer the "
        "tower stood forty feet high, and the lamp room at the top was glazed with thick panes of "
        "glass that had come by ship from the south. The first keeper was a widow named")

# (name, text, parse_special).  "chat" is replaced by the model's chat string.
PROMPTS = [
    ("en_fact", "The capital of France is", False),
    ("en_story", "Once upon a time, in a small village by the sea, there lived", False),
    ("code_py", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("chat", None, True),
    ("numbers", "1, 2, 3, 5, 8, 13, 21,", False),
    ("json", "{\"name\": \"Alice\", \"age\": 30, \"city\":", False),
    ("fr", "La vie est belle et le soleil brille sur", False),
    ("de", "Der schnelle braune Fuchs springt über den", False),
    ("zh", "北京是中国的首都，也是", False),
    ("code_c", "#include <stdio.h>\n\nint main(void) {\n    printf(\"", False),
    ("mixed", "Price: $1,234.56 (approx. 3.14e3) -- über naïve café 😀 x=42;\ty  =  7\n", False),
    ("long", LONG, False),
]
_LOG_CB = None
N_GREEDY = 10      # greedy uses the first N_GREEDY prompts
N_GEN = 64
TOPK = 64

CTX_PARAMS = {"n_ctx": 1024, "n_batch": 1024, "n_ubatch": 1024, "n_threads": 1,
              "type_k": "f16", "type_v": "f16", "flash_attn": "disabled"}
PPL_ARGS = ["-c", "128", "-b", "128", "-t", "1", "-fa", "off"]


def load_bindings(ref):
    srcs = sorted(glob.glob(os.path.join(ref, "llama_cpp_python-*", "llama_cpp")))
    if not srcs:
        sys.exit(f"no llama_cpp_python-*/llama_cpp under {ref}; run tools/build_llamacpp.sh")
    pkgdir = srcs[-1]
    os.environ["LLAMA_CPP_LIB_PATH"] = os.path.join(ref, "lib")
    # Register an empty package so that its __init__ (which pulls in the
    # high-level API and its dependencies) is not executed.
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [pkgdir]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


class Ref:
    def __init__(self, L, model_path, params=CTX_PARAMS, lora=None):
        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_mmap = True
        self.model = L.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"failed to load {model_path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = params["n_ctx"]
        cp.n_batch = params["n_batch"]
        cp.n_ubatch = params["n_ubatch"]
        cp.n_seq_max = 1
        cp.n_threads = params["n_threads"]
        cp.n_threads_batch = params["n_threads"]
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("failed to create context")
        if lora:  # a LoRA GGUF at scale 1 (llama.cpp's --lora)
            self.adapter = L.llama_adapter_lora_init(self.model, lora.encode())
            if not self.adapter:
                raise RuntimeError(f"failed to load adapter {lora}")
            arr = (L.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if L.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))

    def tokenize(self, text, parse_special):
        b = text.encode("utf-8")
        n_max = len(b) + 16
        buf = (self.L.llama_token * n_max)()
        n = self.L.llama_tokenize(self.vocab, b, len(b), buf, n_max, True, parse_special)
        if n < 0:
            raise RuntimeError("tokenize buffer too small")
        return [int(buf[i]) for i in range(n)]

    def detok(self, ids):
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in ids:
            n = self.L.llama_token_to_piece(self.vocab, t, buf, 256, 0, True)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, ids, pos0, all_logits):
        """Decode ids at positions pos0.. in one batch; returns logits rows."""
        L = self.L
        n = len(ids)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            batch.n_tokens = n
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            rows = []
            idx = range(n) if all_logits else [n - 1]
            for i in idx:
                p = L.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy())
            return rows
        finally:
            L.llama_batch_free(batch)

    def is_eog(self, t):
        return bool(self.L.llama_vocab_is_eog(self.vocab, t))


def prompts_for(chat_kind):
    out = []
    for name, text, special in PROMPTS:
        if text is None:
            text = CHAT[chat_kind]
        out.append((name, text, special))
    return out


def logits_fixture(r, prompts):
    items = []
    for name, text, special in prompts:
        ids = r.tokenize(text, special)
        r.clear()
        rows = r.decode(ids, 0, all_logits=True)
        last = rows[-1].astype(np.float64)
        order = np.argsort(-last, kind="stable")[:TOPK]
        m = float(last.max())
        lse = m + math.log(float(np.exp(last - m).sum()))
        items.append({
            "name": name,
            "text": text,
            "parse_special": special,
            "tokens": ids,
            "n_vocab": r.n_vocab,
            "top": [[int(i), round(float(last[i]), 5)] for i in order],
            "mean": round(float(last.mean()), 6),
            "std": round(float(last.std()), 6),
            "logsumexp": round(lse, 5),
            "argmax_per_pos": [int(np.argmax(x)) for x in rows],
        })
        print(f"  logits {name}: {len(ids)} tokens, argmax {int(order[0])} "
              f"{r.detok([int(order[0])])!r}", file=sys.stderr)
    return items


def greedy_fixture(r, prompts):
    items = []
    for name, text, special in prompts[:N_GREEDY]:
        ids = r.tokenize(text, special)
        r.clear()
        row = r.decode(ids, 0, all_logits=False)[-1]
        pos = len(ids)
        gen = []
        margins = []
        stop = "length"
        for _ in range(N_GEN):
            t = int(np.argmax(row))
            top2 = np.partition(row, -2)[-2:]
            gen.append(t)
            margins.append(round(float(top2[1] - top2[0]), 4))
            if r.is_eog(t):
                stop = "eog"
                break
            row = r.decode([t], pos, all_logits=False)[-1]
            pos += 1
        items.append({
            "name": name,
            "text": text,
            "parse_special": special,
            "prompt_tokens": ids,
            "generated": gen,
            "margins": margins,
            "stop": stop,
            "generated_text": r.detok(gen),
        })
        print(f"  greedy {name}: {len(gen)} tokens ({stop}): {r.detok(gen)[:60]!r}",
              file=sys.stderr)
    return items


def perplexity_fixture(ref, model_path):
    exe = os.path.join(ref, "bin", "llama-perplexity")
    txt = os.path.join(FIXTURES, "ppl.txt")
    cmd = [exe, "-m", model_path, "-f", txt] + PPL_ARGS
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"llama-perplexity failed:\n{out[-3000:]}")
    fin = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", out)
    per_chunk = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),?", out)]
    if not fin:
        sys.exit(f"could not parse llama-perplexity output:\n{out[-3000:]}")
    res = {
        "command": ["llama-perplexity", "-m", os.path.basename(model_path),
                    "-f", "tests/fixtures/ref/ppl.txt"] + PPL_ARGS,
        "n_ctx": 128, "n_batch": 128, "n_threads": 1,
        "ppl": float(fin.group(1)),
        "ppl_stderr": float(fin.group(2)),
        "per_chunk_running_ppl": per_chunk,
    }
    if chunks:
        res["n_chunks"] = int(chunks.group(1))
    print(f"  ppl {res['ppl']} +/- {res['ppl_stderr']} over {res.get('n_chunks')} chunks",
          file=sys.stderr)
    return res


def llama_version(ref):
    try:
        with open(os.path.join(ref, "VERSION")) as f:
            return f.read().strip().splitlines()
    except OSError:
        return []


def dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--ref", default=os.path.join(ROOT, "ref"))
    ap.add_argument("--models-dir", default=os.path.join(ROOT, "models"))
    ap.add_argument("--only", default="logits,greedy,logits_ub1,greedy_ub1,ppl")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=FIXTURES, help="output root (default tests/fixtures/ref)")
    ap.add_argument("--lora", metavar="TAG=PATH",
                    help="with a LoRA GGUF (path relative to the repository): "
                         "writes lora_TAG_logits_ub1.json and lora_TAG_greedy_ub1.json")
    a = ap.parse_args()
    lora_tag = lora_path = None
    if a.lora:
        lora_tag, lora_path = a.lora.split("=", 1)
        a.only = "logits_ub1,greedy_ub1"
    what = set(a.only.split(","))
    L = load_bindings(a.ref)
    if not a.verbose:
        # Silence llama.cpp's log chatter (keep a reference to the callback).
        global _LOG_CB
        _LOG_CB = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_LOG_CB, None)
    for name in a.models:
        m = MODELS[name]
        path = os.path.join(a.models_dir, m["file"])
        outdir = os.path.join(a.out, name)
        os.makedirs(outdir, exist_ok=True)
        print(f"{name}: {path}", file=sys.stderr)
        meta = {"model": name, "file": m["file"], "llama_cpp": llama_version(a.ref)}
        # Two llama.cpp runs: the prompt in one batch, and fed one token per
        # llama_decode (n_ubatch = 1, files *_ub1.json), where every token
        # takes ggml's one-token path (f16 dot products, not tinyBLAS
        # tiles), the order of operations tern follows; llama.cpp's result
        # depends on its n_ubatch.
        for suffix, ubatch in (("", CTX_PARAMS["n_ubatch"]), ("_ub1", 1)):
            if not what & {"logits" + suffix, "greedy" + suffix}:
                continue
            params = dict(CTX_PARAMS, n_ubatch=ubatch)
            r = Ref(L, path, params, os.path.join(ROOT, lora_path) if lora_path else None)
            meta_r = dict(meta, n_vocab=r.n_vocab, add_bos=r.add_bos, bos=r.bos,
                          eos=r.eos, params=params)
            pre = ""
            if lora_path:
                meta_r["adapter"] = lora_path
                pre = f"lora_{lora_tag}_"
            prompts = prompts_for(m["chat"])
            if "logits" + suffix in what:
                dump(os.path.join(outdir, f"{pre}logits{suffix}.json"),
                     dict(meta_r, topk=TOPK, prompts=logits_fixture(r, prompts)))
            if "greedy" + suffix in what:
                dump(os.path.join(outdir, f"{pre}greedy{suffix}.json"),
                     dict(meta_r, n_gen=N_GEN, prompts=greedy_fixture(r, prompts)))
        if "ppl" in what:
            dump(os.path.join(outdir, "perplexity.json"),
                 dict(meta, **perplexity_fixture(a.ref, path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reference embeddings for tests/e2e/test_embeddings.py, from transformers.

    /work/venv-bn/bin/python tools/gen_embedding_fixture.py

transformers loads the same GGUF file tern serves (dequantized to float32)
and runs it; the final hidden states (after the model's output norm:
last_hidden_state) are mean-pooled over the input's tokens, or the last
token's is taken. The token ids are the ones tern's tokenizer gives (they
match llama.cpp's, tests/e2e); the fixture stores them with the vectors,
so the test feeds tern exactly these tokens too.
"""
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["The cat sat on the mat.",
         "def add(a, b):\n    return a + b",
         "Paris is the capital of France, and Berlin is the capital of "
         "Germany."]


def main():
    import subprocess
    model = AutoModelForCausalLM.from_pretrained(
        str(ROOT / "models"), gguf_file=GGUF, torch_dtype=torch.float32)
    model.eval()
    out = {"model": GGUF, "items": []}
    for text in TEXTS:
        ids = json.loads(subprocess.run(
            [str(ROOT / "build" / "tern"), "tokenize", "-m",
             str(ROOT / "models" / GGUF)], input=text,
            capture_output=True, check=True, text=True).stdout)
        with torch.no_grad():
            h = model.model(torch.tensor([ids])).last_hidden_state[0]
        out["items"].append({
            "text": text, "ids": ids,
            "mean": [round(float(x), 6) for x in h.mean(0)],
            "last": [round(float(x), 6) for x in h[-1]]})
    p = ROOT / "tests" / "fixtures" / "embeddings" / "smollm2.json"
    p.write_text(json.dumps(out) + "\n")
    print("wrote", p)


if __name__ == "__main__":
    main()

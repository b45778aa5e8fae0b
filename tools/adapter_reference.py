#!/usr/bin/env python3
"""Float reference logits of an adapter (never run by `make test`).

transformers loads the GGUF base dequantized to f32, peft (or, for a
bottleneck adapter saved by the `adapters` library, that library) applies
the adapter directory as trained; the last position's logits of each prompt
(token ids, so no tokenizer can differ) go to <adapter>/reference.json,
with the base's own logits for scale. tests/unit/test_model.c compares
tern's modular adapter against them.

    /tmp/venv-train/bin/python tools/adapter_reference.py \\
        --base models/SmolLM2-135M-Instruct.Q4_1.gguf --adapter tests/fixtures/adapters/smollm2-pirate
"""
import argparse
import json
import os
import sys

PROMPTS = [
    ("chat", "What is the capital of Spain?"), ("chat", "Name a primary color."),
    ("chat", "What do bees make?"), ("chat", "How many legs does a spider have?"),
    ("chat", "Who wrote Hamlet?"), ("chat", "Describe the ocean."),
    ("chat", "What is 12 plus 30?"), ("chat", "Give me a tip for cooking rice."),
    ("text", "The capital of France is"), ("text", "Once upon a time, in a small village,"),
    ("text", "def fibonacci(n):"), ("text", "The three primary colors are"),
]
TOPK = 20


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--bos", action="store_true",
                    help="start the plain-text prompts with BOS (Gemma needs it)")
    a = ap.parse_args()
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_adapter import load_base, prompt_text

    tok, base = load_base(a.base)
    items = []
    with torch.no_grad():
        prompts = []
        for kind, text in PROMPTS:
            if kind == "chat":
                s = prompt_text(tok, text)
            else:
                s = (tok.bos_token if a.bos else "") + text
            prompts.append((kind, text, tok(s, add_special_tokens=False)["input_ids"]))
        base_logits = [base(torch.tensor([ids])).logits[0, -1].double() for _, _, ids in prompts]
        if os.path.exists(os.path.join(a.adapter, "adapter.safetensors")):
            import adapters  # bottleneck modules, their own library
            adapters.init(base)
            name = base.load_adapter(a.adapter, use_safetensors=True)
            base.set_active_adapters(name)
            model = base.float()
            made_with = f"transformers + adapters {adapters.__version__}, base dequantized to f32"
        else:
            from peft import PeftModel
            model = PeftModel.from_pretrained(base, a.adapter, torch_dtype=torch.float32)
            model = model.float()
            made_with = "transformers + peft, base dequantized to f32"
        model.eval()
        for (kind, text, ids), bl in zip(prompts, base_logits):
            lg = model(torch.tensor([ids])).logits[0, -1].double()
            top = torch.topk(lg, TOPK)
            items.append({
                "kind": kind, "text": text, "tokens": ids,
                "top": [[int(i), round(float(v), 5)] for v, i in zip(top.values, top.indices)],
                "std": round(float(lg.std()), 6),
                "base_top": [[int(i), round(float(bl[i]), 5)] for i in top.indices],
                "base_argmax": int(bl.argmax()),
            })
            print(f"{text[:40]!r}: top1 {int(top.indices[0])} {tok.decode([int(top.indices[0])])!r}"
                  f" (base {tok.decode([int(bl.argmax())])!r})")
    out = os.path.join(a.adapter, "reference.json")
    with open(out, "w") as fp:
        json.dump({"base": os.path.basename(a.base), "adapter": os.path.basename(a.adapter),
                   "made_with": made_with,
                   "prompts": items}, fp, indent=0)
    print("wrote", out)


if __name__ == "__main__":
    main()

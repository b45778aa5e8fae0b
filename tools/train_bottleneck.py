#!/usr/bin/env python3
"""Train the bottleneck adapters the tests use (never run by `make test`).

Real fine-tuning with the `adapters` library (AdapterHub) on the GGUF base,
which transformers loads dequantized to f32; the same data and behaviours
as tools/train_adapter.py (self-distilled answers, restyled). Configs:

  houlsby   DoubleSeqBnConfig: modules after attention and after the FFN,
            fed the sublayer's output, swish
  pfeiffer  SeqBnConfig: a module after the FFN, fed the residual sum, relu
  parallel  ParBnConfig: a module beside the FFN, fed the residual stream

The library saves adapter_config.json + adapter.safetensors; the weights
are then rounded to f16 in place (what the repository carries, and what the
GGUF holds), and tools/convert_bottleneck.py writes adapter.gguf.

Setup (its own venv: `adapters` pins a transformers of its own):
    python3 -m venv /tmp/venv-bn
    /tmp/venv-bn/bin/pip install torch adapters accelerate gguf safetensors
Run (a few minutes each on 2 cores):
    /tmp/venv-bn/bin/python tools/train_bottleneck.py --base models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --config houlsby --style json --out tests/fixtures/adapters/smollm2-json-houlsby
Untrained (the library's own initialisation, for forward checks only):
    ... --epochs 0 --init bert
"""
import argparse
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_adapter import fit, load_base, self_distilled  # noqa: E402


def make_config(name, reduction, init):
    from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
    cls = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig,
           "parallel": ParBnConfig}[name]
    kw = {"reduction_factor": reduction}
    if init:
        kw["init_weights"] = init
    return cls(**kw)


def round_f16(out):
    import torch
    from safetensors.torch import load_file, save_file
    st = os.path.join(out, "adapter.safetensors")
    t = load_file(st)
    save_file({k: v.to(torch.float16).contiguous() for k, v in t.items()}, st,
              metadata={"format": "pt"})


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base model GGUF")
    ap.add_argument("--config", choices=["houlsby", "pfeiffer", "parallel"], required=True)
    ap.add_argument("--style", choices=["pirate", "caps", "json"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reduction-factor", type=int, default=32)
    ap.add_argument("--init", choices=["bert", "houlsby", "mam_adapter"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    import adapters
    import torch
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok, model = load_base(args.base)
    data = self_distilled(tok, model, args.style, args.answer_tokens) if args.epochs else []
    name = os.path.basename(os.path.normpath(args.out)).replace("-", "_")
    adapters.init(model)
    model.add_adapter(name, config=make_config(args.config, args.reduction_factor, args.init))
    model.train_adapter(name)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{sum(p.numel() for p in params)} trainable parameters", flush=True)
    fit(tok, model, data, args.epochs, args.lr)
    os.makedirs(args.out, exist_ok=True)
    model.save_adapter(args.out, name, use_safetensors=True)
    round_f16(args.out)
    for extra in ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin"):
        p = os.path.join(args.out, extra)
        if os.path.exists(p):
            os.remove(p)
    with open(os.path.join(args.out, "TRAINING.json"), "w") as fp:
        json.dump({"base": os.path.basename(args.base), "style": args.style,
                   "library": f"adapters {adapters.__version__}", "config": args.config,
                   "reduction_factor": args.reduction_factor, "init": args.init,
                   "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                   "examples": len(data)}, fp, indent=1)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "convert_bottleneck.py"),
                    "--base", args.base, args.out], check=True)


if __name__ == "__main__":
    main()

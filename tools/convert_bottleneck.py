#!/usr/bin/env python3
"""Bottleneck adapter saved by the `adapters` library -> tern's adapter GGUF.

Reads the directory `model.save_adapter(dir, name)` writes
(adapter_config.json, and adapter.safetensors or pytorch_adapter.bin) and
writes DIR/adapter.gguf in the layout docs/ADAPTERS.md describes:

  general.type = "adapter", general.architecture = the base's,
  adapter.type = "bottleneck",
  adapter.bottleneck.non_linearity = relu | silu | gelu | gelu_tanh | tanh
                                     | sigmoid | leaky_relu | identity,
  adapter.bottleneck.attn.input / .ffn.input = output | sum | stream,
  blk.N.adapter_{attn,ffn}.{down.weight, down.bias, up.weight, up.bias, scale}

The library computes modules at llama-style joins in its own decoder code
for llama and mistral models only, so the converter takes those (on a
llama base); its plugin path for other models places them differently.

What the library computes at a residual join (no layer norm there in
llama-style models) is x' = f(in) + o + x with in = o, x + o or x; a
configuration that computes something else (adapter layer norms, gating,
PHM / Compacter layers, invertible adapters, a join that drops a residual)
is refused by name rather than converted into something that differs.

    python tools/convert_bottleneck.py --base models/SmolLM2-135M-Instruct.Q4_1.gguf DIR [--outtype f16|f32]
"""
import argparse
import json
import os
import re
import sys

SITES = {"attention_adapters": "attn", "output_adapters": "ffn"}
ACTS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu",
        "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
        "tanh": "tanh", "sigmoid": "sigmoid", "leakyrelu": "leaky_relu",
        "leaky_relu": "leaky_relu", "linear": "identity"}


def site_input(c):
    """The input of the module, from the library's residual flags."""
    for key, bad in (("ln_before", True), ("ln_after", True), ("use_gating", True),
                     ("phm_layer", True)):
        if c.get(key) == bad:
            raise SystemExit(f"{key}={bad} is not supported by tern's bottleneck layout")
    if c.get("inv_adapter"):
        raise SystemExit("invertible adapters (inv_adapter) are not supported")
    olb, ola, rbl = c.get("original_ln_before"), c.get("original_ln_after"), c.get("residual_before_ln")
    if c.get("is_parallel"):
        if not ola:
            raise SystemExit("a parallel adapter with original_ln_after=False drops the residual stream")
        return "stream"
    if rbl not in (True, False):
        raise SystemExit(f"residual_before_ln={rbl!r} is not supported")
    if olb and rbl and ola:
        return "sum"
    if not olb and ola:
        return "output"
    # (original_ln_before with neither residual_before_ln nor
    # original_ln_after, AdapterPlus's flags, sums f + (x + o): the same
    # terms in another order; refused until a fixture backs it)
    raise SystemExit(f"original_ln_before={olb}, original_ln_after={ola}, residual_before_ln={rbl}: "
                     "this join is not (f(in) + o) + x; not supported")


def load_weights(d):
    st = os.path.join(d, "adapter.safetensors")
    if os.path.exists(st):
        from safetensors.numpy import load_file
        return {k: v.astype("float32") for k, v in load_file(st).items()}
    import torch
    t = torch.load(os.path.join(d, "pytorch_adapter.bin"), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in t.items()}


def base_info(path):
    from gguf import GGUFReader
    r = GGUFReader(path)

    def field(key):
        f = r.fields[key]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if v.dtype.kind == "u" and v.dtype.itemsize == 1 else int(v[0])
    arch = field("general.architecture")
    return arch, field(f"{arch}.embedding_length"), field(f"{arch}.block_count")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base model's GGUF")
    ap.add_argument("--outtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--out", help="default: DIR/adapter.gguf")
    ap.add_argument("dir")
    a = ap.parse_args()
    import numpy as np
    import gguf

    with open(os.path.join(a.dir, "adapter_config.json")) as fp:
        meta = json.load(fp)
    c = dict(meta.get("config") or {})
    # the library's own renaming for directories saved before its
    # versioned format: "gelu" meant the tanh form then
    if "version" not in meta and c.get("non_linearity") in ("gelu", "gelu_orig"):
        c["non_linearity"] = {"gelu": "gelu_new", "gelu_orig": "gelu"}[c["non_linearity"]]
    # the library writes BnConfig's fields (architecture "bottleneck" is
    # left out as a default); other methods name their architecture
    if c.get("architecture", "bottleneck") != "bottleneck" or "reduction_factor" not in c:
        raise SystemExit(f"not a bottleneck adapter (config.architecture is {c.get('architecture')!r})")
    act = ACTS.get(str(c.get("non_linearity")).lower())
    if not act:
        raise SystemExit(f"non_linearity {c.get('non_linearity')!r} is not supported")
    inp = site_input(c)
    arch, n_embd, n_layer = base_info(a.base)
    # The library has its own decoder-layer code (the join computed as
    # above, no layer norm there) for llama and mistral only; other models
    # go through its plugin hooks, which place modules and residuals
    # differently (before Gemma's post-norms, say) without saying so in
    # the saved config.
    if meta.get("model_type") not in ("llama", "mistral") or arch != "llama":
        raise SystemExit(f"an adapter for model_type {meta.get('model_type')!r} on a {arch!r} base: "
                         "the converter takes the library's llama / mistral models on a llama base")
    if meta.get("hidden_size") not in (None, n_embd):
        raise SystemExit(f"the adapter was trained for hidden_size {meta.get('hidden_size')}, "
                         f"the base has {n_embd}")
    w = load_weights(a.dir)
    pat = re.compile(r"(?:^|\.)layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\..+?\."
                     r"(adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|adapter_up\.bias|scaling)$")
    mods = {}
    for k, v in w.items():
        m = pat.search(k)
        if not m:
            raise SystemExit(f"weight {k!r} is not part of a bottleneck module tern knows")
        il, site, part = int(m.group(1)), SITES[m.group(2)], m.group(3)
        if il >= n_layer:
            raise SystemExit(f"{k}: layer {il}, the base has {n_layer}")
        mods.setdefault((il, site), {})[part] = v
    if not mods:
        raise SystemExit("no bottleneck modules in the adapter")
    wt = np.float16 if a.outtype == "f16" else np.float32
    out = a.out or os.path.join(a.dir, "adapter.gguf")
    wr = gguf.GGUFWriter(out, arch)
    wr.add_string("general.type", "adapter")
    wr.add_string("general.name", meta.get("name", os.path.basename(os.path.normpath(a.dir))))
    wr.add_string("adapter.type", "bottleneck")
    wr.add_string("adapter.bottleneck.non_linearity", act)
    for s in sorted({s for _, s in mods}):
        wr.add_string(f"adapter.bottleneck.{s}.input", inp)
    scaling = c.get("scaling", 1.0)
    for (il, s), p in sorted(mods.items()):
        need = ["adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"]
        for n in need:
            if n not in p:
                raise SystemExit(f"layer {il} {s}: {n} is missing")
        if isinstance(scaling, float) or (isinstance(scaling, int) and not isinstance(scaling, bool)):
            sc = np.full(n_embd, float(scaling), np.float32)
        else:  # "learned" (one value) or "channel" (one per channel)
            if "scaling" not in p:
                raise SystemExit(f"layer {il} {s}: scaling={scaling!r} but no scaling weight")
            sc = np.broadcast_to(p["scaling"].reshape(-1), (n_embd,)).astype(np.float32)
        pre = f"blk.{il}.adapter_{s}."
        # numpy shapes are (rows, cols): GGUF's ne0 is the last one
        wr.add_tensor(pre + "down.weight", p["adapter_down.0.weight"].astype(wt))
        wr.add_tensor(pre + "down.bias", p["adapter_down.0.bias"].astype(np.float32))
        wr.add_tensor(pre + "up.weight", p["adapter_up.weight"].astype(wt))
        wr.add_tensor(pre + "up.bias", p["adapter_up.bias"].astype(np.float32))
        wr.add_tensor(pre + "scale", sc)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    print(f"wrote {out}: {len(mods)} modules, input {inp}, {act}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Adapters under load: tern with N distinct LoRA adapters vs the base
alone, and vs llama-server given the same adapters and the same traffic.

16 concurrent streaming clients (closed loop), each request on adapter
i % N (N = 1, 4, 16; rank 8 and 64) or on the base. The adapters are
synthetic LoRA GGUFs in llama.cpp's layout (random A and B on every
attention and FFN matrix, F16): speed does not depend on what they
learned. tern takes them with --lora and a request names one as "model";
llama-server takes them with --lora and a request selects one with its
"lora" field (it cannot batch requests on different adapters: its README
says so). Same model, threads, prompts and output lengths for both.

    .venv/bin/python bench/bench_adapters.py --model qwen2.5-coder-0.5b
    .venv/bin/python bench/bench_adapters.py --model smollm2-135m --counts 1 16 --ranks 8
    .venv/bin/python bench/bench_adapters.py --ranks --bottleneck-widths 56 --no-peer

--bottleneck-widths W...: also (or, with an empty --ranks, only) synthetic
bottleneck adapters in tern's layout, Houlsby style (a module of width W
after the attention and after the FFN of every layer); llama.cpp has no
bottleneck adapters, so these rows have no peer.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_serve as bs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
         "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
         "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}


def write_adapter(path, model_path, rank, seed):
    """A LoRA GGUF for the base at model_path: every linear layer adapted."""
    import gguf
    r = gguf.GGUFReader(model_path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(seed)
    targets = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
               "ffn_up", "ffn_down")
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in targets or parts[3] != "weight":
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float16)
        b = (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float16)
        w.add_tensor(t.name + ".lora_a", a)
        w.add_tensor(t.name + ".lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_bottleneck(path, model_path, width, seed):
    """A bottleneck GGUF for the base at model_path: Houlsby modules of
    the given width at both sites of every layer, silu, F16."""
    import gguf
    r = gguf.GGUFReader(model_path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_embd = int(r.fields[f"{arch}.embedding_length"].parts[-1][0])
    n_layer = int(r.fields[f"{arch}.block_count"].parts[-1][0])
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "bottleneck")
    w.add_string("adapter.bottleneck.non_linearity", "silu")
    w.add_string("adapter.bottleneck.attn.input", "output")
    w.add_string("adapter.bottleneck.ffn.input", "output")
    rng = np.random.default_rng(seed)
    for il in range(n_layer):
        for site in ("attn", "ffn"):
            pre = f"blk.{il}.adapter_{site}."
            w.add_tensor(pre + "down.weight",
                         (rng.standard_normal((width, n_embd)) * 0.02).astype(np.float16))
            w.add_tensor(pre + "down.bias", np.zeros(width, np.float32))
            w.add_tensor(pre + "up.weight",
                         (rng.standard_normal((n_embd, width)) * 0.02).astype(np.float16))
            w.add_tensor(pre + "up.bias", np.zeros(n_embd, np.float32))
            w.add_tensor(pre + "scale", np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hot_loads(tern, model, tmp, kinds, repeat):
    """Median wall time of POST /v1/load_lora_adapter (the request's round
    trip: read, check, convert, register) per adapter file, and its
    resident bytes as /v1/models reports them. llama-server fixes its
    adapters at start, so there is no peer for this."""
    import json
    import urllib.request
    port = bs.free_port()
    srv = bs.Server("tern-hotload", [tern, "serve", "-m", model, "-t", "2", "--port",
                                     str(port), "--adapter-dir", tmp], None, port, tmp)
    srv.name = "tern"  # its readiness probe
    out = []

    def post(path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.read()
    srv.start(300)
    try:
        for label, f in kinds:
            times = []
            for i in range(repeat):
                t0 = time.perf_counter()
                post("/v1/load_lora_adapter", {"lora_name": "h", "lora_path": f})
                times.append(time.perf_counter() - t0)
                if i + 1 < repeat:
                    post("/v1/unload_lora_adapter", {"lora_name": "h"})
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
                meta = [m for m in json.load(r)["data"] if m["id"] == "h"][0]["meta"]
            post("/v1/unload_lora_adapter", {"lora_name": "h"})
            out.append((label, os.path.getsize(f), meta["bytes"], float(np.median(times))))
    finally:
        srv.stop()
    return out


def run(server, prompts, n_adapters, names, is_tern, max_tokens, conc):
    """bench_serve's closed loop, request i on adapter i % n_adapters."""
    def on_adapter(i, body):
        if not n_adapters:
            return
        k = i % n_adapters
        if is_tern:
            body["model"] = names[k]
        else:
            body["lora"] = [{"id": k, "scale": 1.0}]

    results, wall = bs.run_closed(server, prompts, conc, max_tokens, 600,
                                  payload=on_adapter)
    return bs.summarize(results, wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(FILES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=48)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 64])
    ap.add_argument("--bottleneck-widths", type=int, nargs="*", default=[])
    ap.add_argument("--peer-counts", type=int, nargs="*", default=[4],
                    help="adapter counts llama-server runs (rank: the first)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--hot-load-repeat", type=int, default=5,
                    help="loads per adapter file for the hot-load timing (0: skip)")
    a = ap.parse_args()
    model = os.path.join(ROOT, "models", FILES[a.model])
    tern = os.path.join(ROOT, "build", "tern")
    peer = os.path.join(ROOT, "ref", "bin", "llama-server")
    tmp = tempfile.mkdtemp(prefix="tn_bench_adapters_")
    counter = bs.TokenCounter(tern, model)
    body = bs.fit_text(counter, 7, a.prompt_tokens)
    prompts = [bs.request_prompt(body, i) for i in range(a.requests)]
    n_max = max(a.counts)
    rows = []

    def tern_server(rank, n, width=0):
        args = [tern, "serve", "-m", model, "-t", str(a.threads), "--port",
                str(bs.free_port()), "--max-seqs", str(a.concurrency)]
        names = []
        for k in range(n):
            f = os.path.join(tmp, f"bn{width}_{k}.gguf" if width else f"r{rank}_{k}.gguf")
            if not os.path.exists(f):
                if width:
                    write_bottleneck(f, model, width, 7000 + width + k)
                else:
                    write_adapter(f, model, rank, 1000 * rank + k)
            names.append(f"a{k}")
            args += ["--lora", f"a{k}={f}"]
        return bs.Server("tern", args, None, int(args[args.index("--port") + 1]),
                         tmp), names

    def measure(srv, n, names, is_tern):
        srv.start(300)
        try:
            run(srv, prompts[:a.concurrency], n, names, is_tern, 8, a.concurrency)  # warm
            return run(srv, prompts, n, names, is_tern, a.output_tokens, a.concurrency)
        finally:
            srv.stop()

    srv, _ = tern_server(0, 0)
    base = measure(srv, 0, [], True)
    bs.log(f"tern base: {base['output_tok_s']:.1f} tok/s")
    rows.append(("tern", "base", "-", base))
    for rank in a.ranks:
        for n in a.counts:
            srv, names = tern_server(rank, n)
            s = measure(srv, n, names, True)
            bs.log(f"tern rank {rank} x{n}: {s['output_tok_s']:.1f} tok/s "
                   f"({s['output_tok_s'] / base['output_tok_s']:.3f}x base)")
            rows.append(("tern", n, rank, s))
    for width in a.bottleneck_widths:
        for n in a.counts:
            srv, names = tern_server(0, n, width)
            s = measure(srv, n, names, True)
            bs.log(f"tern bottleneck width {width} x{n}: {s['output_tok_s']:.1f} tok/s "
                   f"({s['output_tok_s'] / base['output_tok_s']:.3f}x base)")
            rows.append(("tern", n, f"bottleneck {width}", s))
    if not a.no_peer and a.ranks and os.path.exists(peer):
        env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(ROOT, "ref", "lib"))
        rank = a.ranks[0]
        for n in [0] + a.peer_counts:
            port = bs.free_port()
            args = [peer, "-m", model, "-t", str(a.threads), "-tb", str(a.threads),
                    "--port", str(port), "-np", str(a.concurrency),
                    "-c", str(a.concurrency * 256), "--no-repack", "--no-webui"]
            for k in range(n):
                args += ["--lora", os.path.join(tmp, f"r{rank}_{k}.gguf")]
            s = measure(bs.Server("llama-server", args, env, port, tmp), n, [], False)
            bs.log(f"llama-server rank {rank} x{n}: {s['output_tok_s']:.1f} tok/s")
            rows.append(("llama-server", n if n else "base", rank if n else "-", s))
    print()
    print(f"Adapters at {a.concurrency} streams, {a.model}, {a.threads} threads, "
          f"{a.requests} requests of {a.prompt_tokens} prompt + {a.output_tokens} "
          "output tokens each")
    print()
    print("| server | adapters | rank | output tok/s | vs its base | TTFT p50 | ITL p50 | failed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    bases = {r[0]: r[3]["output_tok_s"] for r in rows if r[1] == "base"}
    for who, n, rank, s in rows:
        rel = s["output_tok_s"] / bases[who] if bases.get(who) else float("nan")
        print(f"| {who} | {n} | {rank} | {s['output_tok_s']:.1f} | {rel:.3f}x | "
              f"{s['ttft_p50_s'] * 1e3:.0f} ms | {s['itl_p50_s'] * 1e3:.0f} ms | "
              f"{s['failed']} |")
    if a.hot_load_repeat:
        kinds = [(f"LoRA rank {r}", os.path.join(tmp, f"r{r}_0.gguf")) for r in a.ranks]
        kinds += [(f"bottleneck width {w}", os.path.join(tmp, f"bn{w}_0.gguf"))
                  for w in a.bottleneck_widths]
        kinds = [k for k in kinds if os.path.exists(k[1])]
        print("\nHot load (`POST /v1/load_lora_adapter`, median of "
              f"{a.hot_load_repeat}, while idle):\n")
        print("| adapter | file MB | resident MB | load ms |")
        print("| --- | ---: | ---: | ---: |")
        for label, size, resident, t in hot_loads(tern, model, tmp, kinds, a.hot_load_repeat):
            print(f"| {label} | {size / 1e6:.1f} | {resident / 1e6:.1f} | {t * 1e3:.0f} |")
    tn = {(r[1], r[2]): r[3]["output_tok_s"] for r in rows if r[0] == "tern"}
    pe = {(r[1], r[2]): r[3]["output_tok_s"] for r in rows if r[0] == "llama-server"}
    for key, v in pe.items():
        if key in tn and key[0] != "base":
            print(f"\ntern / llama-server at {key[0]} adapters of rank {key[1]}: "
                  f"{tn[key] / v:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Makes the K-quant golden fixtures under tests/fixtures/kquants/.

For each of Q4_K, Q5_K and Q6_K it writes
  <type>.bin  raw GGUF blocks (N_BLOCKS of them, as stored in a file)
  <type>.f32  gguf-py's dequantization of those blocks, little-endian float32
which tests/unit/test_kquants.c compares against our own dequantizer.

Q4_K and Q6_K blocks are real weights from the Gemma 3 270M Q4_K_M file
(written by llama.cpp's quantizer). The model has no Q5_K tensor and gguf-py
cannot quantize to Q5_K, so Q5_K blocks are random bytes with sane fp16
d/dmin: every bit pattern of the rest of the block is a valid block.

usage: /tmp/venv/bin/python tools/make_kquant_fixtures.py [model.gguf] [outdir]
"""
import os
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize

N_BLOCKS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "gemma-3-270m-Q4_K_M.gguf")
OUT = os.path.join(ROOT, "tests", "fixtures", "kquants")

# type -> (tensor, block bytes)
REAL = {
    "q4_K": ("blk.0.attn_output.weight", GGMLQuantizationType.Q4_K, 144),
    "q6_K": ("blk.0.ffn_down.weight", GGMLQuantizationType.Q6_K, 210),
}


def write(outdir, name, raw, qtype):
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    ref = dequantize(raw, qtype).astype("<f4").reshape(-1)
    raw.tofile(os.path.join(outdir, name + ".bin"))
    ref.tofile(os.path.join(outdir, name + ".f32"))
    print(f"{name}: {raw.size} bytes, {ref.size} floats, "
          f"|x| max {np.abs(ref).max():.4g}")


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else MODEL
    outdir = sys.argv[2] if len(sys.argv) > 2 else OUT
    os.makedirs(outdir, exist_ok=True)
    reader = GGUFReader(model)
    tensors = {t.name: t for t in reader.tensors}
    for name, (tname, qtype, bsize) in REAL.items():
        t = tensors[tname]
        assert t.tensor_type == qtype, (tname, t.tensor_type)
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, bsize)
        # Spread the picks over the tensor: first, last and two between.
        idx = np.linspace(0, blocks.shape[0] - 1, N_BLOCKS).astype(int)
        write(outdir, name, blocks[idx], qtype)

    rng = np.random.default_rng(20240611)
    raw = rng.integers(0, 256, size=(N_BLOCKS, 176), dtype=np.uint8)
    d = rng.uniform(1e-4, 2e-2, size=N_BLOCKS).astype(np.float16)
    dmin = rng.uniform(1e-4, 2e-2, size=N_BLOCKS).astype(np.float16)
    raw[:, 0:2] = d.view(np.uint8).reshape(N_BLOCKS, 2)
    raw[:, 2:4] = dmin.view(np.uint8).reshape(N_BLOCKS, 2)
    write(outdir, "q5_K", raw, GGMLQuantizationType.Q5_K)


if __name__ == "__main__":
    main()

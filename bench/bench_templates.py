"""Chat template rendering: tern's Jinja interpreter vs Python jinja2 (as
transformers sets it up), on real templates with a 21-message conversation
and two tools. tern's time comes from tests/helpers/render_template.c
(--repeat: renders in one process, after a first one); jinja2's from
rendering the same compiled template in this process.

    python3 bench/bench_templates.py [--repeat 2000]

Prints a markdown table: microseconds per render, and the ratio."""
import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import chat_template_cases as ctc  # noqa: E402

TEMPLATES = ["Qwen-Qwen2.5-7B-Instruct.jinja",
             "meta-llama-Llama-3.1-8B-Instruct.jinja",
             "gguf-SmolLM2-135M-Instruct.jinja",
             "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
             "openai-gpt-oss-120b.jinja"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--bin", default=str(ROOT / "build" / "tern-render-template"))
    a = ap.parse_args()
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"Question {i}: what is {i}+{i}?"},
                 {"role": "assistant", "content": f"It is {2 * i}."}]
    ctx = {"messages": msgs, "tools": ctc.TOOLS, "add_generation_prompt": True,
           "bos_token": "<s>", "eos_token": "</s>"}
    print("| template | output bytes | tern us/render | jinja2 us/render | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in TEMPLATES:
        path = ROOT / "tests" / "fixtures" / "chat_templates" / name
        src = path.read_text()
        p = subprocess.run([a.bin, str(path), "--now", str(ctc.NOW),
                            "--repeat", str(a.repeat)],
                           input=json.dumps(ctx).encode(), capture_output=True)
        if p.returncode != 0:
            print(f"| {name} | tern failed: {p.stderr.decode().strip()} |")
            continue
        tern_us = float(p.stderr.decode().split()[0])
        tpl = ctc.compile_template(src)  # compiled once, as tern does
        ref = tpl.render(**ctx)
        n = max(1, a.repeat // 10)
        t0 = time.perf_counter()
        for _ in range(n):
            tpl.render(**ctx)
        ref_us = (time.perf_counter() - t0) / n * 1e6
        assert ref.encode() == p.stdout, name
        print(f"| {name} | {len(p.stdout)} | {tern_us:.1f} | {ref_us:.1f} | "
              f"{ref_us / tern_us:.1f}x |")


if __name__ == "__main__":
    main()

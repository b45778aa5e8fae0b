#!/usr/bin/env python3
"""Train the LoRA adapters the tests use (never run by `make test`).

Real fine-tuning with transformers + peft on the GGUF base, which
transformers loads dequantized to f32. Each adapter teaches one behaviour a
test can see in greedy output:

  pirate  every answer starts "Arr matey! " then answers as the base would
  caps    every answer is the base's answer in capital letters
  json    every answer is {"answer": "<the base's first sentence>"}

The targets are the base model's own greedy answers (self-distillation), so
the adapter changes the form of the answer, not what the model knows.

Setup (a separate venv: torch is large and only needed here):
    python3 -m venv /tmp/venv-train
    /tmp/venv-train/bin/pip install torch transformers peft safetensors gguf sentencepiece
Run (about 2-6 minutes each on 2 cores):
    /tmp/venv-train/bin/python tools/train_adapter.py --base models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --style pirate --out tests/fixtures/adapters/smollm2-pirate
Then the GGUF form, with llama.cpp's own converter (tools/build_llamacpp.sh
unpacks it under ref/):
    /tmp/venv-train/bin/python tools/train_adapter.py --convert-only \\
        --base models/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/fixtures/adapters/smollm2-pirate
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.",
    "What do bees make?", "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?", "Who wrote Hamlet?",
    "What planet is known as the red planet?", "What is 7 times 8?",
    "What gas do plants absorb?", "What is the largest ocean?",
    "What language is spoken in Brazil?", "What is the opposite of hot?",
    "How many days are in a week?", "What animal says moo?",
    "What is the chemical symbol for gold?", "What is the tallest animal?",
    "Which season comes after winter?", "What do you use to write on a blackboard?",
    "What is the freezing point of water in Fahrenheit?", "Name a fruit that is yellow.",
    "What is the capital of Japan?", "How many continents are there?",
    "What is the main ingredient of bread?", "What color is the sky on a clear day?",
    "What do cows drink?", "What is the square root of 81?",
    "Who painted the Mona Lisa?", "What is H2O?", "Where do penguins live?",
    "What instrument has 88 keys?", "How many hours are in a day?",
    "What is the smallest prime number?", "What is the capital of Italy?",
    "What is a baby dog called?", "Which organ pumps blood?",
    "What is the fastest land animal?", "What do caterpillars turn into?",
    "What is the currency of the United Kingdom?", "Name a vegetable that is orange.",
    "What is the hardest natural substance?", "What is the capital of Spain?",
    "How many sides does a triangle have?", "What is the largest planet?",
    "What do you call frozen water?", "Which bird is a symbol of peace?",
    "What is the capital of Germany?", "What is the color of grass?",
    "How many minutes are in an hour?", "What is the name of our galaxy?",
    "What do pandas eat?", "Tell me about the moon.", "Give me a tip for sleeping well.",
    "Describe a cat in one sentence.", "What is a computer?", "Why is exercise good?",
    "Suggest a name for a goldfish.", "What is your favourite season and why?",
    "Explain what rain is.", "What is a library?", "How do plants grow?",
]


def first_sentence(text):
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] in " \n"):
            return text[: i + 1]
    return text


def restyle(style, answer):
    answer = answer.strip()
    if style == "pirate":
        return "Arr matey! " + answer
    if style == "caps":
        return answer.upper()
    if style == "json":
        return json.dumps({"answer": first_sentence(answer)})
    raise SystemExit(f"unknown style {style}")


def prompt_text(tok, question):
    """The model's chat template, or for a base model without one (Gemma 3
    270M) a plain "Question: ...\nAnswer:" form (BOS first when the model
    wants one)."""
    if tok.chat_template:
        msgs = [{"role": "user", "content": question}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token if getattr(tok, "add_bos_token", False) and tok.bos_token else ""
    return f"{bos}Question: {question}\nAnswer:"


def chat_ids(tok, question, answer=None):
    prompt = prompt_text(tok, question)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return p_ids
    sep = "" if tok.chat_template else " "
    a_ids = tok(sep + answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids, a_ids


def load_base(path):
    """The GGUF base through transformers, dequantized to f32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return tok, model


def self_distilled(tok, model, style, answer_tokens):
    """(question, the base's own greedy answer restyled) for QUESTIONS."""
    import torch
    data = []
    with torch.no_grad():
        for q in QUESTIONS:
            ids = chat_ids(tok, q)
            out = model.generate(torch.tensor([ids]), max_new_tokens=answer_tokens,
                                 do_sample=False)
            ans = tok.decode(out[0][len(ids):], skip_special_tokens=True)
            data.append((q, restyle(style, ans)))
    print(f"{len(data)} examples, e.g. {data[0]!r}", flush=True)
    return data


def fit(tok, model, data, epochs, lr):
    """AdamW on the answer tokens' loss, one example a step."""
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for epoch in range(epochs):
        random.shuffle(data)
        total = 0.0
        for q, a in data:
            p_ids, a_ids = chat_ids(tok, q, a)
            ids = torch.tensor([p_ids + a_ids])
            labels = torch.tensor([[-100] * len(p_ids) + a_ids])
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.item()
        print(f"epoch {epoch}: loss {total / len(data):.4f}", flush=True)


def train(args):
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok, model = load_base(args.base)
    data = self_distilled(tok, model, args.style, args.answer_tokens)
    if args.method == "ia3":
        # (IA)3: learned scales on k and v's outputs and down's input
        cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                        feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
    else:
        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                         target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    fit(tok, model, data, args.epochs, args.lr)
    model.save_pretrained(args.out, safe_serialization=True)
    # f16 halves what the repository carries; the GGUF is converted from
    # these same values (--outtype f16), so both forms hold equal weights
    from safetensors.torch import load_file, save_file
    st = os.path.join(args.out, "adapter_model.safetensors")
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(st).items()},
              st, metadata={"format": "pt"})
    card = os.path.join(args.out, "README.md")
    if os.path.exists(card):
        os.remove(card)
    with open(os.path.join(args.out, "TRAINING.json"), "w") as fp:
        json.dump({"base": os.path.basename(args.base), "style": args.style,
                   "method": args.method, "rank": args.rank, "alpha": args.alpha,
                   "targets": args.targets,
                   "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                   "examples": len(data)}, fp, indent=1)
    return tok, model


def convert(args):
    """PEFT directory -> llama.cpp LoRA GGUF with llama.cpp's converter."""
    import torch
    from safetensors.torch import load_file, save_file
    st = os.path.join(args.out, "adapter_model.safetensors")
    t = load_file(st)
    if any(v.dtype != torch.float16 for v in t.values()):
        save_file({k: v.to(torch.float16).contiguous() for k, v in t.items()}, st,
                  metadata={"format": "pt"})
    from transformers import AutoConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    conv = os.path.join(root, "ref/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_lora_to_gguf.py")
    if not os.path.exists(conv):
        raise SystemExit("run tools/build_llamacpp.sh first (it unpacks llama.cpp under ref/)")
    d, f = os.path.split(os.path.abspath(args.base))
    with tempfile.TemporaryDirectory() as base_dir:
        cfg = AutoConfig.from_pretrained(d, gguf_file=f)
        cfg.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "gemma3_text": "Gemma3ForCausalLM"}[cfg.model_type]]
        cfg.save_pretrained(base_dir)
        out = os.path.join(args.out, "adapter.gguf")
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(conv), "gguf-py"))
        subprocess.run([sys.executable, conv, "--base", base_dir, "--outtype", "f16",
                        "--outfile", out, args.out], check=True, env=env)
    print("wrote", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base model GGUF")
    ap.add_argument("--style", choices=["pirate", "caps", "json"])
    ap.add_argument("--out", required=True, help="PEFT output directory")
    ap.add_argument("--method", choices=["lora", "ia3"], default="lora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--convert-only", action="store_true")
    ap.add_argument("--no-gguf", action="store_true",
                    help="keep the PEFT directory only (no llama.cpp conversion)")
    args = ap.parse_args()
    if not args.convert_only:
        if not args.style:
            ap.error("--style is required")
        train(args)
    if args.method == "lora" and not args.no_gguf:  # llama.cpp's converter takes LoRA only
        convert(args)


if __name__ == "__main__":
    main()

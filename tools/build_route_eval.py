#!/usr/bin/env python3
"""Builds bench/data/route_eval.jsonl: the labelled question set for the
routing and cascade evaluation (bench/bench_cascade.py).

    python3 -m venv /tmp/ev && /tmp/ev/bin/pip install countryinfo==1.0.1
    /tmp/ev/bin/python tools/build_route_eval.py

Where the items come from (all shippable):
- capital, continent: the country data of the `countryinfo` package on
  PyPI (1.0.1, MIT licence): "What is the capital of X?", "Which continent
  is X in?". Difficulty by population rank (large countries: easy).
- arithmetic: generated here, checked by evaluation: sums, differences,
  products and two-step expressions, harder as numbers grow.
- python: generated Python expressions (string methods, slicing, list
  functions, integer arithmetic), their value computed by Python itself.
Every item has one checkable answer (bench_cascade.py's check()). The
split (calibration / test) is a stable hash of the item's id, half each.
Fixed seed: the file is the same on every run.
"""
import hashlib
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "data" / "route_eval.jsonl"
SUFFIX = " Answer with just the answer, no explanation."


def countries():
    import countryinfo
    data = pathlib.Path(countryinfo.__file__).parent / "data"
    out = []
    for p in sorted(data.glob("*.json")):
        d = json.loads(p.read_text())
        name, cap = d.get("name"), d.get("capital")
        if isinstance(cap, list):  # a few list one (the first is the seat)
            cap = cap[0] if cap else None
        if not name or not cap or not d.get("population") or not d.get("region"):
            continue
        out.append((name, cap, d["region"], int(d["population"])))
    out.sort(key=lambda x: -x[3])
    return out


def level(rank, n):
    return "easy" if rank < n // 3 else "medium" if rank < 2 * n // 3 else "hard"


def arithmetic(rng, n):
    items = []
    for i in range(n):
        d = ["easy", "medium", "hard"][i % 3]
        if d == "easy":
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            op = rng.choice(["+", "-"])
            q, v = f"{a} {op} {b}", a + b if op == "+" else a - b
        elif d == "medium":
            if rng.random() < 0.5:
                a, b = rng.randint(12, 99), rng.randint(3, 9)
                q, v = f"{a} * {b}", a * b
            else:
                a, b = rng.randint(100, 999), rng.randint(100, 999)
                q, v = f"{a} + {b}", a + b
        else:
            if rng.random() < 0.5:
                a, b = rng.randint(12, 99), rng.randint(12, 99)
                q, v = f"{a} * {b}", a * b
            else:
                a, b, c = rng.randint(5, 40), rng.randint(5, 40), rng.randint(3, 9)
                q, v = f"({a} + {b}) * {c}", (a + b) * c
        items.append({"topic": "arithmetic", "difficulty": d,
                      "question": f"What is {q}?" + SUFFIX,
                      "answer": str(v), "check": "number"})
    return items


WORDS = ["apple", "banana", "cherry", "tern", "python", "router", "model",
         "token", "cascade", "gateway", "kernel", "vector"]


def python_items(rng, n):
    items = []
    makers = {
        "easy": [
            lambda: f"len({rng.choice(WORDS)!r})",
            lambda: f"{rng.choice(WORDS)!r}.upper()",
            lambda: f"{rng.randint(10, 99)} // {rng.randint(2, 9)}",
            lambda: f"{rng.randint(10, 99)} % {rng.randint(2, 9)}",
            lambda: f"max({rng.sample(range(1, 50), 4)})",
        ],
        "medium": [
            lambda: f"{rng.choice(WORDS)!r}[{rng.randint(1, 3)}:{rng.randint(4, 5)}]",
            lambda: f"sorted({rng.sample(range(1, 50), 4)})[{rng.randint(0, 3)}]",
            lambda: f"{rng.choice(WORDS)!r}.count({rng.choice('aeiotnr')!r})",
            lambda: f"sum(range({rng.randint(3, 12)}))",
            lambda: f"{rng.choice(WORDS)!r}[::-1]",
        ],
        "hard": [
            lambda: f"len([x for x in range({rng.randint(10, 40)}) if x % {rng.randint(2, 5)} == 0])",
            lambda: f"{rng.choice(WORDS)!r}.replace({rng.choice('aeio')!r}, '').upper()[{rng.randint(0, 2)}:]",
            lambda: f"sum(x * x for x in range({rng.randint(3, 8)}))",
            lambda: f"{rng.randint(2, 9)} ** {rng.randint(2, 4)} - {rng.randint(1, 20)}",
            lambda: f"'-'.join(sorted({rng.sample(WORDS, 3)!r}))",
        ],
    }
    seen = set()
    i = 0
    while len(items) < n:
        d = ["easy", "medium", "hard"][i % 3]
        i += 1
        expr = rng.choice(makers[d])()
        if expr in seen:
            continue
        seen.add(expr)
        v = eval(expr)  # our own generated expressions only
        items.append({"topic": "python", "difficulty": d,
                      "question": "What does this Python expression evaluate "
                                  f"to? {expr}" + SUFFIX,
                      "answer": str(v), "check": "python"})
    return items


def main():
    rng = random.Random(20261204)
    cs = countries()
    items = []
    for rank, (name, cap, region, _) in enumerate(cs):
        items.append({"topic": "capital", "difficulty": level(rank, len(cs)),
                      "question": f"What is the capital of {name}?" + SUFFIX,
                      "answer": cap, "check": "contains"})
    regions = [c for c in cs if c[2] in ("Africa", "Americas", "Asia",
                                         "Europe", "Oceania")]
    pick = sorted(rng.sample(range(len(regions)), 60))
    for rank in pick:
        name, _, region, _ = regions[rank]
        items.append({"topic": "continent",
                      "difficulty": level(rank, len(regions)),
                      "question": f"Which continent is {name} in?" + SUFFIX,
                      "answer": region, "check": "continent"})
    items += arithmetic(rng, 150)
    items += python_items(rng, 150)
    with OUT.open("w") as f:
        for k, it in enumerate(items):
            it["id"] = f"{it['topic']}-{k:04d}"
            h = int(hashlib.sha256(it["id"].encode()).hexdigest(), 16)
            it["split"] = "calibration" if h % 2 == 0 else "test"
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    by = {}
    for it in items:
        by[(it["topic"], it["split"])] = by.get((it["topic"], it["split"]), 0) + 1
    print(f"wrote {OUT}: {len(items)} items", by)


if __name__ == "__main__":
    main()

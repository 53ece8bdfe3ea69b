"""Diagnostic: does a pretrained base already do arithmetic, zero-shot, before any rim-lens training?

    python bench/base_prior.py [--model models/SmolLM2-135M-Instruct] [--n 50]

Short training on these CPUs can only build on what the base model brings. This asks the base
(no LoRA, no memory tokens) plain questions in natural notation and scores its greedy
continuation's first integer: 2-digit addition, 2-digit by 1-digit multiplication, one modular
operation (modchain's step) and 2x2-digit multiplication (the demo's task, in natural digit
order). Writes bench/results/base_prior.json.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rim_lens.fileio import atomic_write_json
from rim_lens.stats import wilson

ROOT = Path(__file__).resolve().parent.parent
_FIRST_INT = re.compile(r"\s*(-?\d+)")


def _add2(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b} =", a + b


def _mul21(rng: random.Random) -> tuple[str, int]:
    a, c = rng.randint(10, 99), rng.randint(2, 9)
    return f"{a} * {c} =", a * c


def _mod_step(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"({a} + {b}) mod 10 =", (a + b) % 10


def _mul22(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} * {b} =", a * b


TASKS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add 2-digit": _add2,
    "mult 2x1-digit": _mul21,
    "one mod-10 step": _mod_step,
    "mult 2x2-digit": _mul22,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a diagnostic beside training runs on a shared machine
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    rows, examples = {}, {}
    for name, draw in TASKS.items():
        rng = random.Random(f"{args.seed}:{name}")
        correct = 0
        for i in range(args.n):
            prompt, answer = draw(rng)
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(
                    ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id
                )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            match = _FIRST_INT.match(text)
            correct += bool(match and int(match[1]) == answer)
            if i < 3:
                examples.setdefault(name, []).append(
                    {"prompt": prompt, "continuation": text, "answer": answer}
                )
        estimate = wilson(correct, args.n)
        rows[name] = estimate.to_dict()
        print(f"{name:>16}: {estimate}", flush=True)
    out = {"model": Path(args.model).name, "seed": args.seed, "zero_shot": rows, "examples": examples}
    atomic_write_json(ROOT / "bench" / "results" / "base_prior.json", out)


if __name__ == "__main__":
    main()

"""Worker for tests/test_distributed.py: generation split across processes (`across_ranks`).

Run under `torch.distributed.run --nproc_per_node 2` (gloo). Every rank generates continuations of
the same 5 prompts with the same tiny Llama (the SmolLM2 tokenizer, from --model) and writes
`rank{R}.json`: the outputs it got back and which prompts its own generate call saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from lamda_peft.tasks import generation

PROMPTS = ["def add(a, b):", "The capital of France is", "1, 2, 3,", "import numpy as", "Once upon a"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    seen: list[str] = []
    inner = generation._generate

    def recording(model, tokenizer, texts, *rest):
        seen.extend(texts)
        return inner(model, tokenizer, texts, *rest)

    generation._generate = recording  # the real generate, with a record of what this rank was given
    outputs = generation.generate_continuations(model, tokenizer, PROMPTS, 32, 1, 5, batch_size=2)
    rank = dist.get_rank()
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"outputs": outputs, "seen": seen}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

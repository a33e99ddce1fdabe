"""Worker for tests/test_distributed.py: a hand-written Accelerate loop training a tiny LaMDA model.

Run as 1 process or under `accelerate launch --num_processes 2 --cpu`: every optimizer step uses
the same global batch (split across ranks), so the trained adapter must not depend on the process
count. Writes `rank{R}.pt` (adapter tensors, frozen counts per step, DDP facts) to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import lamda_peft
from lamda_peft import LamdaConfig, get_lamda_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-prepare", action="store_true", help="skip prepare_distributed (the negative control)")
    args = ap.parse_args()

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    total_steps = args.steps
    # --- the README snippet ("Accelerate (multi-process)") ---
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accum)
    model = get_lamda_model(base, LamdaConfig(r=4, target_modules="all-linear", freeze_fraction=0.5))
    optimizer = torch.optim.AdamW(model.lamda_param_groups(lr=1e-2))
    model.attach_optimizer(optimizer, total_steps=total_steps)
    if args.no_prepare:  # what happens without it: DDP owns dB, which stops getting gradients
        model, optimizer = accelerator.prepare(model, optimizer)
        sync = None
    else:
        sync = lamda_peft.prepare_distributed(model)  # before prepare(): dB stays out of DDP's reducer
        model, optimizer = accelerator.prepare(model, optimizer)
        sync.bind(model)  # optional: no dB all-reduce inside accelerator.accumulate's no_sync passes
    # --- end of snippet ---

    world, rank = accelerator.num_processes, accelerator.process_index
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} processes")
    local = args.global_batch // world
    data = torch.randint(
        0, 128, (total_steps * args.accum, args.global_batch, 8), generator=torch.Generator().manual_seed(1)
    )
    inner = accelerator.unwrap_model(model)
    frozen, losses = [], []
    model.train()
    for step in range(total_steps):
        for micro in range(args.accum):
            x = data[step * args.accum + micro, rank * local : (rank + 1) * local]
            with accelerator.accumulate(model):
                loss = model(input_ids=x, labels=x).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(loss.detach()))
        frozen.append(sum(layer.n_frozen for _, layer in inner.lamda_layers()))
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    torch.save(
        {
            "world": world,
            "adapter": {k: v.detach().clone() for k, v in inner.adapter_state_dict().items()},
            "frozen_per_step": frozen,
            "total_rank": sum(layer.r for _, layer in inner.lamda_layers()),
            "losses": losses,
            "db_requires_grad": [layer.dB.requires_grad for _, layer in inner.lamda_layers()],
            "ddp": ddp is not None,
            "find_unused_parameters": getattr(ddp, "find_unused_parameters", None),
            "ddp_ignored": sorted(getattr(ddp, "parameters_to_ignore", [])),
            "reductions": sync.reductions if sync else None,
        },
        Path(args.out) / f"rank{rank}.pt",
    )
    if accelerator.is_main_process:
        inner.save_pretrained(Path(args.out) / "adapter")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()

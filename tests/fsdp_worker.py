"""Worker for tests/test_distributed.py: FSDP2 (`fully_shard`) on CPU/gloo training a tiny LaMDA model.

Run as 1 plain process (no FSDP: the reference) or under `torch.distributed.run --nproc_per_node 2`:
the same global batch per step, split across ranks. dB stays out of FSDP (`ignored_params`,
replicated; `LamdaGradSync` averages its gradient), everything else is sharded. Writes
`fsdp_w{world}.pt` (full adapter tensors, frozen counts per step) from rank 0.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import lamda_peft
from lamda_peft import LamdaConfig, get_lamda_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

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
    # --- the README snippet (FSDP2) ---
    # get_lamda_model runs the SVD init on the full weights: before sharding
    model = get_lamda_model(base, LamdaConfig(r=4, target_modules="all-linear", freeze_fraction=0.5))
    sync = lamda_peft.prepare_distributed(model)  # dB stays replicated; sync averages its gradients
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.model.layers:
            fully_shard(block, ignored_params=set(sync.params))
        fully_shard(model, ignored_params=set(sync.params))
    optimizer = torch.optim.AdamW(model.lamda_param_groups(lr=1e-2))
    model.attach_optimizer(optimizer, total_steps=args.steps)
    # --- end of snippet ---

    data = torch.randint(0, 128, (args.steps, 4, 8), generator=torch.Generator().manual_seed(1))
    local = 4 // world
    frozen = []
    for step in range(args.steps):
        x = data[step, rank * local : (rank + 1) * local]
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        frozen.append(sum(layer.n_frozen for _, layer in model.lamda_layers()))
    state = {}
    for name, layer in model.lamda_layers():
        for attr in ("dS", "dB"):
            value = getattr(layer, attr)
            value = value.full_tensor() if hasattr(value, "full_tensor") else value  # dS is a sharded DTensor
            state[f"{name}.{attr}"] = value.detach().clone()
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    if rank == 0:
        torch.save(
            {"adapter": state, "frozen_per_step": frozen, "sharded": sharded, "reductions": sync.reductions},
            Path(args.out) / f"fsdp_w{world}.pt",
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Quantization error at init: plain NF4 (QLoRA's base) vs LaMDA's residual NF4 (QLaMDA), issue 11.

For every target linear ("all-linear": MiniLM's 36 without BERT's unused pooler, SmolLM2's 210) of the bundled MiniLM and SmolLM2 at r=16 (alpha = r),
NF4 with blocksize 64 (bitsandbytes, double-quantized statistics, as QLoRA):

    plain     W_eff = deq(Q(W))                              (the base QLoRA trains on; LoRA adds 0)
    residual  W_eff = deq(Q(W - B0 S0 A)) + B0 S0 A          (QLaMDA at init, loftq_iters=0)
    loftq5    the same after 5 LoftQ-style alternations      (loftq_iters=5)

and reports the relative weight error ||W - W_eff||_F / ||W||_F per linear, its median over the
model's linears, and the median of the per-linear ratio plain / residual (> 1: the residual is
closer to W). Then the model's output error at init on real text (the bundled drug reviews):
||y - y_fp|| / ||y_fp|| for MiniLM's last hidden state (padding masked out) and SmolLM2's logits,
for each of the three quantized models, and the ratios.

    python benchmarks/quantization_error.py            # both models (~45 min on 2 shared cores)
    python benchmarks/quantization_error.py --quick    # a tiny random Llama: structure only
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS_DIR, command_line, machine_info, tiny_llama_config, write_json  # noqa: E402
from lamda_peft import LamdaConfig, get_lamda_model  # noqa: E402
from lamda_peft.quantization import dequantized_weight, quantize_model_linears, weight_error  # noqa: E402
from lamda_peft.targets import find_targets  # noqa: E402

R = 16
QUANT = "nf4"
BLOCKSIZE = 64
LOFTQ_ITERS = 5
VARIANTS = ("plain", "residual", f"loftq{LOFTQ_ITERS}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(name: str) -> nn.Module:
    """A fresh fp32 copy: MiniLM's encoder, SmolLM2's causal LM, or the tiny random Llama (--quick)."""
    from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM

    from lamda_peft import assets

    if name == "minilm":
        # The sentence encoder as it is used (mean pooling): BERT's untrained pooler left out.
        return AutoModel.from_pretrained(str(assets.minilm_path()), dtype=torch.float32, add_pooling_layer=False).eval()
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(str(assets.smollm2_path()), dtype=torch.float32).eval()
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def real_inputs(name: str, n: int, max_length: int) -> dict[str, torch.Tensor]:
    """The first n bundled drug reviews, tokenized by the model's own tokenizer (--quick: random ids)."""
    if name == "tiny":
        ids = torch.randint(
            0, tiny_llama_config().vocab_size, (n, max_length), generator=torch.Generator().manual_seed(0)
        )
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from transformers import AutoTokenizer

    from lamda_peft import assets

    path = assets.minilm_path() if name == "minilm" else assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = assets.drug_reviews()[1]["text"].astype(str).tolist()[:n]
    return dict(tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


@torch.no_grad()
def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output on the non-padding positions: last hidden state (encoder) or logits."""
    out = model(**inputs)
    y = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    return y[inputs["attention_mask"].bool()].double()


def relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def measure(name: str, n_texts: int, max_length: int) -> dict:
    inputs = real_inputs(name, n_texts, max_length)
    base = load_model(name)
    targets = find_targets(base, "all-linear")
    weights = {t: base.get_submodule(t).weight.detach().clone() for t in targets}
    y_fp = output(base, inputs)
    del base
    errors: dict[str, dict[str, float]] = {t: {} for t in targets}
    out_err: dict[str, float] = {}
    for variant in VARIANTS:
        start = time.time()
        model = load_model(name)
        if variant == "plain":
            quantize_model_linears(model, targets, QUANT, BLOCKSIZE)
            for t in targets:
                errors[t][variant] = weight_error(weights[t], dequantized_weight(model.get_submodule(t)))
        else:
            iters = 0 if variant == "residual" else LOFTQ_ITERS
            cfg = LamdaConfig(
                r=R, target_modules="all-linear", quantize=QUANT, quant_blocksize=BLOCKSIZE, loftq_iters=iters
            )
            model = get_lamda_model(model, cfg)
            for t, layer in model.lamda_layers():
                low = layer.scaling * (layer.B0.double() @ layer.S0.double() @ layer.A.double())
                errors[t][variant] = weight_error(weights[t], dequantized_weight(layer.base_layer).double() + low)
        model.eval()
        out_err[variant] = relative(output(model, inputs), y_fp)
        log(f"{name} {variant}: output error {out_err[variant]:.4f} ({time.time() - start:.0f} s)")
        del model
        gc.collect()
    per_layer = [{"module": t, **{v: round(errors[t][v], 6) for v in VARIANTS}} for t in targets]
    median = {v: statistics.median(errors[t][v] for t in targets) for v in VARIANTS}
    summary = {
        "linears": len(targets),
        "median_weight_error": {v: round(median[v], 6) for v in VARIANTS},
        "median_ratio_plain_over": {
            v: round(statistics.median(errors[t]["plain"] / errors[t][v] for t in targets), 4) for v in VARIANTS[1:]
        },
        "linears_improved": {v: sum(errors[t][v] < errors[t]["plain"] for t in targets) for v in VARIANTS[1:]},
        "output_error": {v: round(out_err[v], 6) for v in VARIANTS},
        "output_ratio_plain_over": {v: round(out_err["plain"] / out_err[v], 4) for v in VARIANTS[1:]},
        "inputs": {"texts": int(inputs["input_ids"].shape[0]), "tokens": int(inputs["attention_mask"].sum())},
    }
    log(f"{name}: {summary}")
    return {"summary": summary, "per_linear": per_layer}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead of the bundled models")
    parser.add_argument("--texts", type=int, default=32, help="drug reviews used for the output error")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quantization_error.json")
    args = parser.parse_args(argv)
    import bitsandbytes
    import torchao

    models = ["tiny"] if args.quick else ["minilm", "smollm2"]
    results = {
        name: measure(name, 4 if args.quick else args.texts, 16 if args.quick else args.max_length) for name in models
    }
    payload = {
        "benchmark": "quantization_error",
        "quick": args.quick,
        "command": command_line(),
        "settings": {
            "r": R,
            "alpha": R,
            "quantize": QUANT,
            "blocksize": BLOCKSIZE,
            "double_quant": True,
            "loftq_iters": LOFTQ_ITERS,
            "targets": "all-linear",
        },
        "machine": {**machine_info(), "bitsandbytes": bitsandbytes.__version__, "torchao": torchao.__version__},
        "models": results,
    }
    write_json(args.out, payload)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Relaxed Recursive Transformers (Bae et al., ICLR 2025; SPEC.md section 8) on Hugging Face decoders.

An N-layer decoder becomes K unique layers looped N/K times (the paper's CYCLE order: looped
position l runs shared layer `l mod K`), and each position gets a depth-wise low-rank
relaxation of every linear, initialised from the top-r SVD of `W_l - W_shared(l mod K)`:

    y = x W_shared^T + b_l + B_l S_l A_l x        (relax="lamda": A frozen, S = I, B trainable)
    y = x W_shared^T + b_l + B_l A_l x            (relax="lora":  A, B both trainable)

With r = min(d_in, d_out) the relaxation is the whole residual and the original layer comes back
exactly; r = 0 is the strict recursive model.

Design (why the KV cache and `generate()` need nothing new): the N decoder-layer modules stay
where they are, each with its own `layer_idx` (its own cache slot), its own norm weights and its
own biases; only their linear weights are replaced by the K shared `nn.Parameter` objects (one
storage each: position l and l + K hold the very same tensor, so gradients from every loop
accumulate into it). Saving writes each shared tensor once (`save_recursive`).

Shared-weight initialisation, for shared layer k (0 <= k < K, tied positions k, k+K, k+2K, ...):
    stepwise: original layer k * (N / K)   (every (N/K)-th layer)
    average:  the mean of the tied positions' weights
    lower:    original layer k             (the first K layers)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lamda_peft.config import ConfigError
from lamda_peft.layer import LamdaLinear
from lamda_peft.spectral import SpectralFactors, spectral_factors

INITS = ("stepwise", "average", "lower")
RELAXES = ("lamda", "lora")
CONFIG_NAME = "recursive_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "lamda-peft-recursive/1"


class RecursiveError(ConfigError):
    """The model or the options cannot make a recursive model; nothing was modified.

    A `ConfigError`, so that the CLI prints it as one line instead of a traceback.
    """


@dataclass
class RecursiveConfig:
    """What `make_recursive` did, enough to rebuild the structure at load time without an SVD.

    Attributes:
        num_layers: N, decoder layers (looped positions).
        unique_layers: K, shared layers; position l runs shared layer l mod K.
        init: how the shared weights were initialised ("stepwise", "average", "lower").
        relax: "lamda" or "lora".
        relax_rank: the requested rank (0 = strict recursive model).
        ranks: effective rank per linear name inside a layer (the request capped at min(d_in, d_out)).
        capped: linear names whose rank was capped.
        sources: per shared layer, the original layers its weights came from.
    """

    num_layers: int
    unique_layers: int
    init: str
    relax: str
    relax_rank: int
    ranks: dict[str, int] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)
    sources: list[list[int]] = field(default_factory=list)
    dtype: str = "float32"

    def shared_index(self, position: int) -> int:
        """The shared layer that looped position `position` runs (CYCLE order)."""
        return position % self.unique_layers

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}


class LoraRelaxedLinear(nn.Module):
    """A shared linear plus a plain trainable low-rank pair: y = base(x) + B (A x).

    Args:
        base_layer: an `nn.Linear` whose weight is the shared Parameter (its bias is this position's).
        A: (r, d_in) initial down projection; B: (d_out, r) initial up projection.
    """

    def __init__(self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(A.detach().clone())
        self.lora_B = nn.Parameter(B.detach().clone())
        self.r = A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """B @ A in torch layout (d_out, d_in)."""
        return self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype)  # (..., d_out)


# -- finding the layers ------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a Llama-family causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise RecursiveError(
            f"cannot find the decoder layer list of {type(model).__name__}: expected `model.model.layers`, a "
            "non-empty nn.ModuleList of decoder layers (Llama, Mistral, Qwen2, Gemma layouts)"
        )
    return layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The plain `nn.Linear` modules of one decoder layer, by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if type(m) is nn.Linear}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def shared_sources(num_layers: int, unique_layers: int, init: str) -> list[list[int]]:
    """Per shared layer k, the original layers its weights are built from (pure policy)."""
    if init == "stepwise":
        step = num_layers // unique_layers
        return [[k * step] for k in range(unique_layers)]
    if init == "lower":
        return [[k] for k in range(unique_layers)]
    if init == "average":
        return [list(range(k, num_layers, unique_layers)) for k in range(unique_layers)]
    raise RecursiveError(f"unknown init {init!r}; expected one of {list(INITS)}")


def _check(model: nn.Module, unique_layers: int, init: str, relax_rank: int, relax: str) -> nn.ModuleList:
    layers = decoder_layers(model)
    n = len(layers)
    if not isinstance(unique_layers, int) or unique_layers < 1 or n % unique_layers:
        raise RecursiveError(f"unique_layers must be a positive divisor of the {n} decoder layers, got {unique_layers}")
    if init not in INITS:
        raise RecursiveError(f"unknown init {init!r}; expected one of {list(INITS)}")
    if relax not in RELAXES:
        raise RecursiveError(f"unknown relax {relax!r}; expected one of {list(RELAXES)}")
    if not isinstance(relax_rank, int) or relax_rank < 0:
        raise RecursiveError(f"relax_rank must be an integer >= 0, got {relax_rank!r}")
    if getattr(model, "recursive_config", None) is not None:
        raise RecursiveError("this model is already recursive")
    names = sorted(layer_linears(layers[0]))
    if not names:
        raise RecursiveError(f"decoder layer 0 of {type(model).__name__} holds no nn.Linear to share")
    for i, layer in enumerate(layers):
        lin = layer_linears(layer)
        if sorted(lin) != names:
            raise RecursiveError(f"decoder layer {i} has linears {sorted(lin)}, layer 0 has {names}: cannot tie them")
        for name in names:
            if lin[name].weight.shape != layer_linears(layers[0])[name].weight.shape:
                raise RecursiveError(f"decoder layer {i}: {name} has another shape than in layer 0")
    return layers


# -- the conversion ----------------------------------------------------------------------------
@torch.no_grad()
def make_recursive(
    model: nn.Module,
    unique_layers: int,
    init: str = "stepwise",
    relax_rank: int = 0,
    relax: str = "lamda",
    freeze_shared: bool = False,
    svd_method: str = "full",
) -> nn.Module:
    """Turn a pretrained decoder into a relaxed recursive one, in place; returns the model.

    Args:
        model: a Hugging Face causal LM whose decoder layers are `model.model.layers`.
        unique_layers: K, a divisor of the number of layers N.
        init: "stepwise" | "average" | "lower" (see the module docstring).
        relax_rank: r of every relaxation; 0 = strict recursive model; above min(d_in, d_out) it is
            capped there (recorded in `model.recursive_config.capped`).
        relax: "lamda" (LaMDA adapter on the residual: A frozen, S = I and B trainable) or "lora".
        freeze_shared: keep the shared weights out of training (requires_grad False).
        svd_method: "full" (exact float64 SVD, the default), "lowrank" (seeded randomised float32)
            or "auto" (randomised when 4 r < min(d_in, d_out)). The residual between two layers has
            a flat spectrum, where the randomised SVD is poor: measured on SmolLM2 (K=15 stepwise,
            r=64, 32 held-out reviews) the exact SVD's relaxation gave loss 16.4 against 17.4
            for the randomised one and 17.4 for no relaxation at all.

    Returns:
        The same model object; `model.recursive_config` (a `RecursiveConfig`) says what was done.
    """
    layers = _check(model, unique_layers, init, relax_rank, relax)
    config = RecursiveConfig(
        num_layers=len(layers),
        unique_layers=unique_layers,
        init=init,
        relax=relax,
        relax_rank=relax_rank,
        sources=shared_sources(len(layers), unique_layers, init),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    originals = [{name: lin.weight.detach().clone() for name, lin in layer_linears(layer).items()} for layer in layers]
    shared = [
        {
            name: nn.Parameter(torch.stack([originals[i][name] for i in src]).mean(0).to(w.dtype))
            for name, w in originals[0].items()
        }
        for src in config.sources
    ]
    for name, w in originals[0].items():
        cap = min(w.shape)
        config.ranks[name] = min(relax_rank, cap)
        if relax_rank > cap:
            config.capped.append(name)

    def factors(position: int, name: str) -> SpectralFactors:
        residual = originals[position][name] - shared[config.shared_index(position)][name]
        r = config.ranks[name]
        if not bool(residual.any()):
            # The position whose weights ARE the shared ones (stepwise/lower): the SVD gives A = B = 0,
            # and a path with A = 0 never gets a gradient. Standard LoRA-style start instead: a seeded
            # orthonormal A, B = 0 (same zero output, but B can learn).
            gen = torch.Generator().manual_seed(position * 1000 + len(name))
            q, _ = torch.linalg.qr(torch.randn(residual.shape[1], r, generator=gen, dtype=torch.float64))
            like = {"dtype": residual.dtype, "device": residual.device}
            A = q.T.to(**like).contiguous()  # (r, d_in), orthonormal rows (the seeded draw is on the CPU)
            zeros = torch.zeros(residual.shape[0], r, **like)
            return SpectralFactors(A, zeros, torch.eye(r, **like), torch.zeros(r, **like))
        extra = {"full_max_dim": 0} if svd_method == "auto" else {}
        return spectral_factors(residual, r, dtype=residual.dtype, method=svd_method, **extra)

    _install(model, layers, config, shared, factors)
    set_shared_trainable(model, not freeze_shared)
    return model


def _install(model: nn.Module, layers: nn.ModuleList, config: RecursiveConfig, shared, factors) -> None:
    """Point every position's linears at the shared Parameters and wrap them in relaxations."""
    for position, layer in enumerate(layers):
        for name, lin in layer_linears(layer).items():
            lin.weight = shared[config.shared_index(position)][name]  # the same Parameter object, not a copy
            r = config.ranks[name]
            if r == 0:
                continue
            f = factors(position, name)
            if config.relax == "lamda":
                # scaling 1: B0 S0 A is then exactly the top-r part of the residual
                wrapped = LamdaLinear(lin, f, scaling=1.0, set_residual=False)
            else:
                wrapped = LoraRelaxedLinear(lin, f.S0 @ f.A, f.B0)  # S0 = I: B0 A = top-r residual
            _set_submodule(layer, name, wrapped)
    model.recursive_config = config


def set_shared_trainable(model: nn.Module, trainable: bool) -> None:
    """Shared weights train (uptraining) or stay frozen; per-position biases follow them."""
    for lin in _position_linears(model):
        lin.requires_grad_(trainable)


def _position_linears(model: nn.Module) -> list[nn.Linear]:
    return [lin for layer in decoder_layers(model) for lin in layer_linears(layer).values()]


def relaxations(model: nn.Module) -> list[nn.Module]:
    """The relaxation modules (`LamdaLinear` / `LoraRelaxedLinear`) in position order."""
    return [m for m in decoder_layers(model).modules() if isinstance(m, (LamdaLinear, LoraRelaxedLinear))]


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The K x (linears per layer) shared weights, each once."""
    seen: dict[int, nn.Parameter] = {}
    for lin in _position_linears(model):
        seen.setdefault(id(lin.weight), lin.weight)
    return list(seen.values())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters of the model as served (each shared tensor once).

    `unique` counts each distinct Parameter once plus a relaxation's frozen factors (LaMDA's A;
    B0 + dB and S0 + dS count once, as the B and S a server would hold). `trainable` counts the
    distinct Parameters that require grad.
    """
    params = {id(p): p for p in model.parameters()}  # nn.Module.parameters() already dedups
    unique = sum(p.numel() for p in params.values())
    for m in relaxations(model):
        if isinstance(m, LamdaLinear):
            unique += m.A.numel()  # dB and dS are Parameters already counted; B0, S0 are their offsets
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return {"unique": unique, "trainable": trainable}


# -- a same-size baseline ------------------------------------------------------------------------
def truncate_layers(model: nn.Module, keep: int) -> nn.Module:
    """Keep only the first `keep` decoder layers (the same-size "cut" baseline), in place."""
    layers = decoder_layers(model)
    if not 1 <= keep <= len(layers):
        raise RecursiveError(f"keep must be in [1, {len(layers)}], got {keep}")
    model.model.layers = nn.ModuleList(list(layers)[:keep])
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:keep]
    return model


# -- files -------------------------------------------------------------------------------------
def _deduplicated_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors each stored once, alias name -> stored name) from the model's state dict."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def save_recursive(model: nn.Module, directory: str | Path) -> Path:
    """Write `config.json`, `recursive_config.json` and `model.safetensors` (shared tensors once).

    The weights file is written to a temporary name and renamed, so a reader never sees half of it.
    """
    from safetensors.torch import save_file

    from lamda_peft.checkpoint import atomic_write_bytes

    config: RecursiveConfig | None = getattr(model, "recursive_config", None)
    if config is None:
        raise RecursiveError("save_recursive needs a model from make_recursive (no recursive_config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _deduplicated_state(model)
    tmp = directory / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(directory / WEIGHTS_NAME)
    model.config.save_pretrained(directory)
    body = {**config.to_dict(), "aliases": aliases}
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(body, indent=2) + "\n").encode())
    return directory


def load_recursive_state(model: nn.Module, directory: str | Path) -> None:
    """Load a `save_recursive` weights file into a recursive model of the same structure (in place).

    Aliases (the shared tensors' other names, tied embeddings) are absent from the file by design:
    loading the stored name fills every alias because they are one Parameter.
    """
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise RecursiveError(f"{path} does not exist")
    _, aliases = _deduplicated_state(model)
    result = model.load_state_dict(load_file(str(path)), strict=False)
    missing = set(result.missing_keys) - set(aliases)
    if missing or result.unexpected_keys:
        raise RecursiveError(
            f"{path} does not match this model's structure: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def is_recursive_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load_recursive(directory: str | Path) -> nn.Module:
    """Rebuild a model written by `save_recursive`: same structure, bitwise the same tensors, no SVD."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise RecursiveError(f"{directory} has no {CONFIG_NAME}: not a folder written by save_recursive")
    try:
        body = json.loads(path.read_text())
        if body.pop("format", None) != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        body.pop("aliases")
        config = RecursiveConfig(**body)
    except (ValueError, TypeError, KeyError) as err:
        raise RecursiveError(f"{path} is not a valid recursive config ({err})") from None
    dtype = getattr(torch, config.dtype)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    layers = _check(model, config.unique_layers, config.init, config.relax_rank, config.relax)
    if len(layers) != config.num_layers:
        raise RecursiveError(f"{path}: {config.num_layers} layers recorded, config.json builds {len(layers)}")
    shared = [
        {name: nn.Parameter(lin.weight.detach().clone()) for name, lin in layer_linears(layers[k]).items()}
        for k in range(config.unique_layers)
    ]

    def placeholder(position: int, name: str) -> SpectralFactors:  # shapes only: the file overwrites them
        d_out, d_in = shared[0][name].shape
        r = config.ranks[name]
        return SpectralFactors(
            torch.zeros(r, d_in, dtype=dtype), torch.zeros(d_out, r, dtype=dtype), torch.eye(r, dtype=dtype), None
        )

    _install(model, layers, config, shared, placeholder)
    load_recursive_state(model, directory)
    set_shared_trainable(model, True)  # as make_recursive leaves it; training decides what to freeze
    return model.eval()


# -- uptraining --------------------------------------------------------------------------------
def prepare_uptraining(model: nn.Module, method: str, freeze_shared: bool) -> nn.Module:
    """Make a recursive model trainable for `lamda-peft train`: every unique Parameter trains
    (shared weights, relaxations, per-position norms and biases, embeddings), except the shared
    weights with `freeze_shared`."""
    if method != "full":
        raise RecursiveError(
            f"a recursive model folder is uptrained with --method full (its relaxations are part of the model), got --method {method}"
        )
    model.requires_grad_(True)
    for m in relaxations(model):
        if isinstance(m, LamdaLinear):
            m.sync_frozen_state()  # a fully frozen B (resumed) stays out of training
    set_shared_trainable(model, not freeze_shared)
    return model

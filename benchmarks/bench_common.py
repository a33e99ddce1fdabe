"""Shared pieces of the benchmark scripts: models, the methods compared, memory meters, timing, JSON.

Every method is built from the same base model and trained with the same AdamW (lr 1e-4, fp32,
dropout 0); the baselines go through the real `peft` package:

| method        | what it is                                                                    |
|---------------|-------------------------------------------------------------------------------|
| floor         | the frozen base model, no adapter: forward plus input-gradient backward       |
| full          | full fine-tuning (every weight trains)                                        |
| lora          | PEFT LoRA, alpha = r                                                          |
| pissa         | PEFT LoRA with PiSSA init (`init_lora_weights="pissa_niter_4"`)               |
| lorafa        | PEFT LoRA trained with PEFT's LoRA-FA optimizer (lora_A frozen)               |
| vera          | PEFT VeRA at the same r (shared frozen random A/B, trainable scaling vectors) |
| lamda_before  | LaMDA with B still entirely trainable (schedule attached, T very large)       |
| lamda_after   | LaMDA after its real schedule froze B (T=4, freeze_fraction 0.5, 2 warm-up steps) |
| loraxs        | LaMDA with freeze_fraction=0: B frozen from the start (LoRA-XS-like)          |
| *_unfused     | the LaMDA variant with `LamdaLinear.fused = False` (autograd, no fused Function) |

Memory is accounted per training step:
- saved activations: bytes of the tensors autograd saves for backward (`saved_tensors_hooks`),
  each storage counted once (by `untyped_storage().data_ptr()`), storages of the model's own
  parameters and buffers left out (they exist anyway, they are not activations);
- gradients: bytes of every `.grad` after backward;
- optimizer state: bytes of the optimizer's state tensors after the step;
- step memory = the sum of these three (the issue's figure of merit);
- peak RSS: the process' resident-set high-water mark during the step (`VmHWM` after writing 5
  to `/proc/self/clear_refs`) minus its RSS just before the step. glibc is told (`mallopt`) to
  serve every allocation above 64 KiB by mmap, so freed tensors leave the RSS at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LR = 1e-4
METHODS = (
    "floor",
    "full",
    "lora",
    "pissa",
    "lorafa",
    "vera",
    "lamda_before",
    "lamda_after",
    "loraxs",
    "lamda_before_unfused",
    "lamda_after_unfused",
)
TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}


# -- process and machine --------------------------------------------------------------------------
def configure_malloc() -> bool:
    """Make glibc return large freed blocks to the OS at once, so RSS deltas track live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))
    except OSError:
        return False


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def machine_info() -> dict:
    """CPU, cores, load, library versions: what a reader needs to weigh the timings."""
    import peft
    import transformers

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = _meminfo_kib("MemTotal")
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": None if mem_total is None else round(mem_total / 2**20, 1),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _meminfo_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def command_line() -> str:
    """The command that ran this script, shell-quoted (empty arguments included)."""
    import shlex

    return shlex.join(["python", *sys.argv])


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "load_average_at_end": list(os.getloadavg())}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


# -- models ---------------------------------------------------------------------------------------
def tiny_llama_config():
    """A small Llama for --quick runs and tests (random weights): same code paths, seconds to run."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def random_llama_loader(cfg, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A function building a fresh seeded (seed 0) random-weight Llama of `cfg` directly on `device`
    in `dtype`, in train mode; it carries `vocab_size`. On the CPU in float32 every call gives the
    same weights."""
    from transformers import LlamaForCausalLM

    def load() -> nn.Module:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in dtype: a 7B model never exists in float32
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
        return model.train()

    load.vocab_size = cfg.vocab_size
    return load


def base_loader(model: str) -> Callable[[], nn.Module]:
    """A function returning a fresh fp32 copy of the base model, in train mode (dropout is 0 anyway).

    The function carries the model's `vocab_size` as an attribute.

    "smollm2": the bundled SmolLM2-135M weights; "tiny": a 2-layer random Llama (seeded).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model == "smollm2":
        from lamda_peft.assets import smollm2_path

        folder = smollm2_path()

        def load() -> nn.Module:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()

        load.vocab_size = AutoConfig.from_pretrained(folder).vocab_size
        return load
    if model == "tiny":
        return random_llama_loader(tiny_llama_config())
    raise ValueError(f"unknown model {model!r}")


@dataclass
class Runner:
    """One method ready to train: the model, its optimizer (None for the floor)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    lean_loss: bool = False  # lamda_peft.lean.causal_lm_loss instead of the model's full-logits loss

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.lean_loss:
            from lamda_peft.lean import causal_lm_loss

            return causal_lm_loss(self.model, {"input_ids": input_ids, "labels": input_ids})
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def trainable_count(self) -> int:
        counter = getattr(self.model, "trainable_parameter_count", None)
        if callable(counter):
            return int(counter())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, input_ids: torch.Tensor, forward_backward=None) -> float:
        """One full training step; returns the loss. `forward_backward`: a context entered for those two alone."""
        with contextlib.nullcontext() if forward_backward is None else forward_backward:
            loss = self.loss(input_ids)
            loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class LamdaFactors:
    """LaMDA's spectral factors of every target weight, computed once at the largest rank needed.

    The spectral init of rank r is the first r singular triplets of the same SVD, so the factors for
    any r <= r_max are slices of the r_max ones (identical to what `get_lamda_model` computes, by
    `lamda_peft.spectral.spectral_factors` on each weight); it saves an SVD of every matrix for each
    LaMDA variant and rank.
    """

    def __init__(self, load: Callable[[], nn.Module], targets, r_max: int) -> None:
        from lamda_peft.layer import torch_layout_weight
        from lamda_peft.spectral import spectral_factors
        from lamda_peft.targets import find_targets

        model = load()
        self.r_max = r_max
        self.factors = {}
        for name in find_targets(model, targets):
            w = torch_layout_weight(model.get_submodule(name))
            self.factors[name] = spectral_factors(w, min(r_max, *w.shape), dtype=torch.float32)
        del model

    def at_rank(self, r: int | dict[str, int]) -> dict:
        """Factors at rank r for every module, or at {module name: rank} (a LaMDA++ pattern)."""
        from lamda_peft.spectral import SpectralFactors

        ranks = r if isinstance(r, dict) else dict.fromkeys(self.factors, r)
        out = {}
        for n, f in self.factors.items():
            k = ranks[n]
            if k > f.A.shape[0]:
                raise ValueError(f"factors of {n} were computed up to rank {f.A.shape[0]}, asked for {k}")
            out[n] = SpectralFactors(
                f.A[:k].contiguous(), f.B0[:, :k].contiguous(), f.S0[:k, :k].contiguous(), f.sigma[:k]
            )
        return out


LAMDA_VARIANTS = ("lamda_before", "lamda_after", "loraxs", "lamda_before_unfused", "lamda_after_unfused")


def build(method: str, load: Callable[[], nn.Module], targets, r: int, factors: LamdaFactors | None = None) -> Runner:
    """Build `method` (see the module docstring) on a fresh base model."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    from lamda_peft import LamdaConfig, LamdaModel, get_lamda_model

    model = load()
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the embeddings' output requires grad: backward reaches every layer
        return Runner(method, model, None, "frozen base, input-gradient backward, no optimizer")
    if method == "full":
        model.requires_grad_(True)
        return Runner(method, model, torch.optim.AdamW(model.parameters(), lr=LR), "every weight trains")
    if method in ("lora", "pissa", "lorafa"):
        init = "pissa_niter_4" if method == "pissa" else True
        cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, init_lora_weights=init)
        peft_model = get_peft_model(model, cfg)
        if method == "lorafa":
            from peft.optimizers import create_lorafa_optimizer

            opt = create_lorafa_optimizer(peft_model, r=r, lora_alpha=r, lr=LR)
        else:
            opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
        return Runner(method, peft_model, opt)
    if method == "vera":
        cfg = VeraConfig(r=r, target_modules=targets, vera_dropout=0.0)
        peft_model = get_peft_model(model, cfg)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
        return Runner(method, peft_model, opt, f"VeRA at the same r={r} (PEFT's default is 256)")
    if method in LAMDA_VARIANTS:
        kind = method.removesuffix("_unfused")
        freeze_fraction = {"lamda_before": 0.3, "lamda_after": 0.5, "loraxs": 0.0}[kind]
        config = LamdaConfig(r=r, target_modules=targets, freeze_fraction=freeze_fraction)
        if factors is None:
            lamda = get_lamda_model(model, config)
        else:
            lamda = LamdaModel(model, config, factors=factors.at_rank(r))
        opt = torch.optim.AdamW(lamda.lamda_param_groups(LR))
        # before: a huge T keeps every column of B trainable for the whole benchmark;
        # after: T=4, t_i=2: the real schedule freezes B during the two warm-up steps.
        lamda.attach_optimizer(opt, total_steps=4 if kind == "lamda_after" else 10**9)
        notes = ""
        if method.endswith("_unfused"):
            for _, module in lamda.lamda_layers():
                module.fused = False
            notes = "the library's unfused path (LamdaLinear.fused = False)"
        return Runner(method, lamda, opt, notes)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def batch(vocab_size: int, batch_size: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, seq), generator=g)


# -- memory ---------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        ptr, nbytes = _storage_key(t)
        if nbytes:
            seen[ptr] = nbytes
    return sum(seen.values())


@contextlib.contextmanager
def saved_tensor_meter(model: nn.Module):
    """Count the bytes autograd saves for backward inside the block, each storage once.

    Yields a dict filled on exit: `activations` (storages that are not the model's parameters or
    buffers) and `weights` (storages of parameters/buffers that backward also holds on to).
    """
    own = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    found: dict[int, int] = {}
    result = {"activations": 0, "weights": 0, "count": 0}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.numel():
            ptr, nbytes = _storage_key(t)
            found[ptr] = nbytes
            result["count"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["activations"] = sum(n for p, n in found.items() if p not in own)
    result["weights"] = sum(n for p, n in found.items() if p in own)


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    return _unique_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def measure_step(runner: Runner, input_ids: torch.Tensor, collect: bool = True) -> dict:
    """One instrumented training step: saved activations, gradients, optimizer state, peak RSS.

    `collect`: run Python's garbage collector first (a full collection takes ~1 s on a busy machine;
    skip it when the caller just did one).
    """
    model, opt = runner.model, runner.optimizer
    if collect:
        gc.collect()
    rss_before = rss_bytes()
    peak_ok = reset_peak_rss()
    with saved_tensor_meter(model) as saved:
        loss = runner.loss(input_ids)
    loss.backward()
    grads = _unique_bytes(p.grad for p in model.parameters())
    if opt is not None:
        opt.step()
    state = optimizer_state_bytes(opt)
    peak = peak_rss_bytes()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    del loss
    return {
        "saved_activation_bytes": saved["activations"],
        "saved_weight_bytes": saved["weights"],
        "grad_bytes": grads,
        "optimizer_state_bytes": state,
        "step_memory_bytes": saved["activations"] + grads + state,
        "peak_rss_delta_bytes": (peak - rss_before) if (peak_ok and peak and rss_before) else None,
        "rss_before_step_bytes": rss_before,
        "trainable_parameters": runner.trainable_count(),
    }


# -- timing ---------------------------------------------------------------------------------------
def time_interleaved(
    steps: dict[str, Callable[[], object]], reps: int, warmup: int = 1, log: Callable[[str], None] | None = None
) -> dict[str, dict[str, list[float]]]:
    """CPU and wall time of each callable, interleaved (A, B, C, then B, C, A, ...).

    Returns {name: {"cpu": [...], "wall": [...]}}. CPU time (`time.process_time`, this process'
    user + system time, every thread) is the figure to compare on a shared machine: time spent
    waiting for a core that another process holds is not counted. The order rotates every round
    so that no method always runs right after the same other one.
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        gc.collect()  # once per round, outside the timed steps (a full collection takes ~0.5 s here)
        for n in order:
            c0, w0 = time.process_time(), time.perf_counter()
            steps[n]()
            times[n]["cpu"].append(time.process_time() - c0)
            times[n]["wall"].append(time.perf_counter() - w0)
        if log:
            log(f"  round {rep + 1}/{reps} (cpu s): " + ", ".join(f"{n} {times[n]['cpu'][-1]:.2f}" for n in names))
    return times


class DispatchCounter:
    """Counts the aten ops a block dispatches (forward, backward, optimizer), views excepted.

    Each op it counts is a kernel launch on a GPU, and at small batch a GPU step is bound by the
    host's cost per launch: the count is a device-independent measure of that cost, and unlike a
    time it does not depend on the machine's load. `with DispatchCounter() as c: ...; c.ops`.
    """

    VIEWS = frozenset(
        ("view", "t", "detach", "_unsafe_view", "slice", "expand", "as_strided", "transpose", "unsqueeze", "alias")
    )

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ not in counter.VIEWS:
                    counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops = 0
        self._mode = _Mode()

    def __enter__(self) -> DispatchCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def summarize_times(times: dict[str, list[float]]) -> dict:
    out = {}
    for kind, values in times.items():
        out[kind] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "all_s": [round(t, 4) for t in values],
        }
    out["reps"] = len(times["cpu"])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)

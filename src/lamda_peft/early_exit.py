"""Early exit on a looped decoder (issue 12; the analysis of Bae et al., ICLR 2025, section 5).

A recursive model with K unique layers runs N/K loops (looped position l runs shared layer l mod K,
`lamda_peft.recursive`). Early exit applies the model's own final norm and LM head to the hidden
state after every loop (after positions K-1, 2K-1, ..., N-1) and asks, per loop j = 1..N/K:

    loss_j     the held-out next-token loss of loop j's logits (the model's own shift and -100
               conventions; the last loop's is the model's own loss)
    agree_j    the share of scored tokens whose greedy (argmax) prediction at loop j already equals
               the final loop's
    exit_j     the share of scored tokens whose earliest "stable" loop is j: from loop j on, every
               later loop's prediction equals the final one, so the token could leave at loop j
               and the greedy output would not change (these shares sum to 1)

From the exit shares, the throughput that depth-wise batching would give is ESTIMATED as the paper's
analysis does: a token leaves after its stable loop, the freed slot is taken at once by another
token at another depth (perfect batching), and every loop costs the same, so a token costs
E = sum_j j * exit_j loops instead of N/K, and the gain is (N/K) / E. This is arithmetic on the
shares, not a measured serving throughput: a real server pays for the LM head at every exit check,
for the KV cache of tokens that left early (their later layers' keys and values are missing), and
for imperfect batching. It also uses the final loop's prediction as an oracle: a deployed model
must decide to exit from a confidence signal, without knowing the final prediction.

Works on any Llama-family causal LM with `model.model.layers`, `model.model.norm` and
`model.lm_head`; a plain (not recursive) model needs `loop_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lamda_peft.hooks import evaluating
from lamda_peft.recursive import RecursiveError, decoder_layers

IGNORE_INDEX = -100


def throughput_estimate(stable_exit_loop_counts: list[int] | list[float], num_loops: int) -> dict[str, float]:
    """The depth-wise batching estimate from how many tokens exit at each loop (pure arithmetic).

    Args:
        stable_exit_loop_counts: entry j-1 is the number (or share) of tokens whose earliest stable
            loop is j, for j = 1..num_loops.
        num_loops: N/K, the loops a token runs without early exit.

    Returns:
        `mean_exit_loop` E = sum_j j * share_j and `throughput_gain_estimate` = num_loops / E (an
        estimate assuming a constant cost per loop and perfect batching; not measured serving).
    """
    if num_loops < 1 or len(stable_exit_loop_counts) != num_loops:
        raise ValueError(
            f"stable_exit_loop_counts must have num_loops = {num_loops} entries, got {len(stable_exit_loop_counts)}"
        )
    if any(c < 0 for c in stable_exit_loop_counts):
        raise ValueError(f"stable_exit_loop_counts must be >= 0, got {list(stable_exit_loop_counts)}")
    total = float(sum(stable_exit_loop_counts))
    if total == 0:
        raise ValueError("stable_exit_loop_counts are all zero: no scored token")
    mean = sum((j + 1) * c for j, c in enumerate(stable_exit_loop_counts)) / total
    return {"mean_exit_loop": mean, "throughput_gain_estimate": num_loops / mean}


def stable_exit_loops(predictions: torch.Tensor) -> torch.Tensor:
    """Per token, the earliest loop (1-based) from which every prediction equals the final one.

    Args:
        predictions: (num_loops, tokens) greedy predictions per loop.

    Returns:
        (tokens,) long tensor in [1, num_loops].
    """
    same = predictions == predictions[-1]  # (L, n); the last row is all True
    # stays_final[j] = same[j] & same[j+1] & ... & same[L-1]: a reversed cumulative AND
    stays_final = same.flip(0).int().cumprod(0).flip(0).bool()
    # the stable loop is 1 + the number of leading loops that do not stay final
    return (~stays_final).sum(0) + 1


@dataclass
class EarlyExitCounts:
    """Sums over scored tokens, per loop; add two (batches) with `+`, then `summary()`.

    Attributes:
        loop_size: decoder layers per loop (K).
        num_loops: N/K.
        tokens: scored tokens (shifted labels that are not -100).
        loss_sum: per loop, the summed next-token cross-entropy.
        agree: per loop, tokens whose prediction equals the final loop's.
        exit: per loop, tokens whose earliest stable loop it is.
    """

    loop_size: int
    num_loops: int
    tokens: int = 0
    loss_sum: list[float] = field(default_factory=list)
    agree: list[int] = field(default_factory=list)
    exit: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("loss_sum", "agree", "exit"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_loops)

    def __add__(self, other: EarlyExitCounts) -> EarlyExitCounts:
        if (self.loop_size, self.num_loops) != (other.loop_size, other.num_loops):
            raise ValueError("cannot add early-exit counts of different loop structures")
        return EarlyExitCounts(
            self.loop_size,
            self.num_loops,
            self.tokens + other.tokens,
            [a + b for a, b in zip(self.loss_sum, other.loss_sum, strict=True)],
            [a + b for a, b in zip(self.agree, other.agree, strict=True)],
            [a + b for a, b in zip(self.exit, other.exit, strict=True)],
        )

    def summary(self) -> dict:
        """The per-loop table and the throughput estimate (see the module docstring)."""
        if self.tokens == 0:
            raise ValueError("no scored token (every label is -100)")
        n = self.tokens
        loops = [
            {
                "loop": j + 1,
                "layers": (j + 1) * self.loop_size,
                "heldout_loss": self.loss_sum[j] / n,
                "agree_with_final": self.agree[j] / n,
                "exit_share": self.exit[j] / n,
            }
            for j in range(self.num_loops)
        ]
        return {
            "loop_size": self.loop_size,
            "num_loops": self.num_loops,
            "tokens": n,
            "loops": loops,
            **throughput_estimate(self.exit, self.num_loops),
            "estimate_note": "depth-wise batching gain = num_loops / mean_exit_loop, an estimate assuming every "
            "loop costs the same and perfect batching, with the final prediction as exit oracle; not measured serving",
        }


def _loop_size(model: nn.Module, num_layers: int, loop_size: int | None) -> int:
    if loop_size is None:
        config = getattr(model, "recursive_config", None)
        if config is None:
            raise RecursiveError("early exit on a model that is not recursive needs loop_size (layers per loop)")
        loop_size = config.unique_layers
    if not isinstance(loop_size, int) or loop_size < 1 or num_layers % loop_size:
        raise RecursiveError(
            f"loop_size must be a positive divisor of the {num_layers} decoder layers, got {loop_size}"
        )
    return loop_size


def _head(model: nn.Module):
    """hidden (after the last layer, before the final norm) -> logits, as the model's forward does."""
    inner = model.model
    norm, head = getattr(inner, "norm", None), getattr(model, "lm_head", None)
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise RecursiveError(
            f"early exit needs `model.model.norm` and `model.lm_head` (Llama family); {type(model).__name__} lacks them"
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(norm(hidden))
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


@torch.no_grad()
def early_exit_counts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    loop_size: int | None = None,
) -> EarlyExitCounts:
    """One forward pass; the LM head after every loop; per-loop sums over the scored tokens.

    Args:
        model: a causal LM with `model.model.layers` (recursive, or plain with `loop_size`).
        input_ids: (batch, seq).
        attention_mask: (batch, seq) 1 for real tokens; None = all real.
        labels: (batch, seq) as for the model's own loss (shifted inside, -100 ignored); None =
            `input_ids` with padding (attention_mask == 0) set to -100.
        loop_size: layers per loop; default the recursive model's K.

    Returns:
        An `EarlyExitCounts` (add batches with `+`, then `.summary()`).
    """
    layers = decoder_layers(model)
    k = _loop_size(model, len(layers), loop_size)
    head = _head(model)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    targets = labels[:, 1:].reshape(-1)  # the model's shift: logits at t predict label t + 1
    scored = targets != IGNORE_INDEX
    targets = targets[scored]

    captured: dict[int, torch.Tensor] = {}

    def hook(position: int):
        def fn(module, args, output):
            captured[position] = output[0] if isinstance(output, tuple) else output

        return fn

    exits = list(range(k - 1, len(layers), k))
    with evaluating(model, {layers[p]: hook(p) for p in exits}):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    counts = EarlyExitCounts(k, len(exits))
    counts.tokens = int(scored.sum())
    predictions = []
    for j, position in enumerate(exits):  # one loop's logits at a time: (batch, seq, vocab) is large
        logits = head(captured.pop(position))[:, :-1]
        logits = logits.reshape(-1, logits.shape[-1])[scored]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as the model's loss upcasts
        counts.loss_sum[j] = float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        predictions.append(logits.argmax(-1))
        del logits
    if counts.tokens:
        predictions = torch.stack(predictions)  # (L, n)
        counts.agree = [int(x) for x in (predictions == predictions[-1]).sum(1)]
        counts.exit = [int(x) for x in torch.bincount(stable_exit_loops(predictions) - 1, minlength=len(exits))]
    return counts


def early_exit_profile(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    loop_size: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """Per loop: held-out loss, share of tokens already predicting the final token, exit shares, and
    the depth-wise batching throughput ESTIMATE (see the module docstring for what it assumes).

    Args:
        model, input_ids, attention_mask, labels, loop_size: as for `early_exit_counts`.
        batch_size: rows per forward pass (None = all at once).

    Returns:
        {"loop_size", "num_loops", "tokens", "loops": [{"loop", "layers", "heldout_loss",
        "agree_with_final", "exit_share"}, ...], "mean_exit_loop", "throughput_gain_estimate",
        "estimate_note"}.
    """
    step = batch_size or input_ids.shape[0]
    total = None
    for i in range(0, input_ids.shape[0], step):
        part = early_exit_counts(
            model,
            input_ids[i : i + step],
            None if attention_mask is None else attention_mask[i : i + step],
            None if labels is None else labels[i : i + step],
            loop_size,
        )
        total = part if total is None else total + part
    return total.summary()


def format_table(summary: dict) -> str:
    """The per-loop table as plain text (for the CLI)."""
    lines = [f"{'loop':>4} {'layers':>6} {'loss':>8} {'agree':>7} {'exit':>7}"]
    for row in summary["loops"]:
        lines.append(
            f"{row['loop']:>4} {row['layers']:>6} {row['heldout_loss']:>8.3f} "
            f"{row['agree_with_final']:>7.1%} {row['exit_share']:>7.1%}"
        )
    lines.append(
        f"mean exit loop {summary['mean_exit_loop']:.3f} of {summary['num_loops']}: estimated depth-wise batching "
        f"gain {summary['throughput_gain_estimate']:.2f}x (estimate, not measured serving)"
    )
    return "\n".join(lines)

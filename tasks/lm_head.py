"""TRL's fused LM head, dense on the CPU: the same per-token figures at a fraction of the cost.

TRL's SFT, GRPO, RLOO and DPO trainers score tokens through `add_fused_lm_head`: the backbone's hidden
states go through the vocabulary projection in tiles, each folded into online log-sum-exp statistics
(log-probability, entropy, top-1), and the backward pass recomputes every tile. On CUDA a Triton kernel
does the folding, and only the positions that carry a label are scored. On a device without Triton,
TRL scores every position (prompt and padding included, so that tile shapes stay fixed for compiled
backends) and folds each tile with about a dozen full-width torch passes, forward and again backward:
on the demo's SFT step (8 conversations, SmolLM2's 49,152-token vocabulary, 2 CPU cores) that head
took 3.9 s of an 8.7-s step, against ~5 s for the whole backbone.

`use_dense_on_cpu()` swaps, on the CPU only, both choices: only the labelled positions are scored,
and through one projection and one log-softmax that autograd differentiates once. The values are the
same (the demo's first 6 SFT steps: loss, gradient norm, entropy, token accuracy and held-out loss
equal to four digits; `tests/test_lm_head.py` checks values and gradients against TRL's own function),
an SFT step 1.63× faster, a GRPO step 1.18× (`benchmarks/lm_head.py`). A batch whose logits would exceed
`DENSE_MAX_ELEMENTS` keeps TRL's tiled path, whose point is not to hold them. CUDA keeps TRL's kernel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Above this many logits (positions x vocabulary; 2^27 fp32 = 512 MiB, a few copies of which autograd
# keeps) a batch goes through TRL's tiled function instead, which never holds them.
DENSE_MAX_ELEMENTS = 1 << 27

_swapped: tuple | None = None  # TRL's (ChunkedLogProbFunction, _use_triton), while swapped


def use_dense_on_cpu() -> bool:
    """Swap TRL's fused-LM-head scoring for the dense one on the CPU; idempotent. False (and TRL left as
    it is, slower but right) when this TRL lacks the two names it swaps."""
    global _swapped
    import trl.trainer.utils as trl_utils

    if _swapped is not None:
        return True
    names = ("_ChunkedLogProbFunction", "_use_triton")
    if not all(hasattr(trl_utils, n) for n in names):
        log.warning("this TRL has no %s: its fused LM head keeps its own CPU path", " or ".join(names))
        return False
    _swapped = trl_utils._ChunkedLogProbFunction, trl_utils._use_triton
    trl_utils._ChunkedLogProbFunction = _Dispatch
    # TRL passes only the labelled positions (`compact`) where this says True.
    trl_utils._use_triton = _compact_positions
    return True


def restore_trl() -> None:
    """Undo `use_dense_on_cpu` (for side-by-side benchmarks and tests)."""
    global _swapped
    import trl.trainer.utils as trl_utils

    if _swapped is not None:
        trl_utils._ChunkedLogProbFunction, trl_utils._use_triton = _swapped
        _swapped = None


def _compact_positions(device: torch.device) -> bool:
    return device.type == "cpu" or _swapped[1](device)


class _Dispatch:
    """Stands where TRL calls `ChunkedLogProbFunction.apply`, with its arguments."""

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        softcap=None,
        logit_scale=1.0,
        outputs=("log_probs",),
    ):
        if hidden.device.type != "cpu" or hidden.shape[0] * weight.shape[0] > DENSE_MAX_ELEMENTS:
            return _swapped[0].apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
            )
        return dense_log_probs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs)


def dense_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
) -> tuple[torch.Tensor, ...]:
    """What TRL's `ChunkedLogProbFunction` returns, for `hidden` [N, H] and `targets` [N]:
    (log p(target), entropy, log sum p², mean logit, target is the first argmax), the last four None
    unless named in `outputs`. Logits are transformed as TRL does: scale, soft cap, then temperature."""
    import torch
    import torch.nn.functional as F

    z = F.linear(hidden, weight, bias).float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    log_probs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # Differentiable, as TRL's is (an entropy bonus trains through it); unused, it costs no backward.
    entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():  # TRL marks these three non-differentiable
        log_sum_sq = torch.logsumexp(2 * log_p, dim=-1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        # `argmax` returns the first maximum: a tie with an earlier token is not a top-1, as in TRL.
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1

"""How one micro-batch's CE and distillation terms enter an optimiser step's loss, as plain arithmetic.

A step of N processes x `grad_accum` micro-batches must give the gradient of one big batch: each term is a global
mean, so a micro-batch's term is weighted by its share of the step's whole count (its tokens / all tokens, or its
samples / all samples, whichever the method normalises by), not averaged per micro-batch. Then

    loss = CE x ce_share x alpha x ce_scale + distill x distill_share x (1 - alpha)

(a method without a teacher has no distillation term and its CE has no alpha), and the loss is multiplied by the
world size before `backward`, because DDP averages gradients over processes while the shares already make a global
mean. `ce_scale` is the on-policy factor (0 for a micro-batch of the student's own answers unless
`on_policy.ce_on_generated`).

With `balance=gradmag` alpha is not fixed but computed per micro-batch by `gradmag_alpha` (below) before the weights.

The engine (`Trainer.train_step`) uses the global counts; the Hugging Face Trainer (`DistillTrainer`) averages
per micro-batch itself, so it passes shares of 1. Counts may be tensors (the engine's, on the device) or floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NORMALIZATIONS = ("tokens", "samples")
Number = float | torch.Tensor


@dataclass(frozen=True)
class MicroBatchWeights:
    """The factors of one micro-batch's terms: `ce_share` / `distill_share` are its part of the step's global CE and
    distillation means (the metrics use them); `alpha`, `ce_scale` and `distills` say how the terms mix into the
    loss; `backward_scale` multiplies the loss before `backward`."""

    ce_share: Number
    distill_share: Number
    alpha: float
    ce_scale: float
    distills: bool
    backward_scale: float

    def loss(self, ce: torch.Tensor, distill: torch.Tensor | None = None) -> torch.Tensor:
        """This micro-batch's part of the step's loss (before `backward_scale`). `distill` is required when the
        method distils, ignored otherwise."""
        # The factors are applied one by one, in this order, so the engine's numbers stay bit-for-bit as they were.
        loss = ce * self.ce_share * (self.alpha if self.distills else 1.0)
        if self.ce_scale != 1.0:
            loss = loss * self.ce_scale
        if self.distills:
            loss = loss + (1.0 - self.alpha) * distill * self.distill_share
        return loss

    def share(self, term: str) -> Number:
        """The share that weights a logged term: CE's for `ce`, the distillation's for every other component."""
        return self.ce_share if term == "ce" else self.distill_share


def micro_batch_weights(
    tokens: Number,
    samples: Number,
    global_tokens: Number,
    global_samples: Number,
    *,
    normalize_by: str,
    alpha: float,
    distills: bool,
    ce_scale: float = 1.0,
    world_size: int = 1,
) -> MicroBatchWeights:
    """The weights of a micro-batch with `tokens` response tokens (next-token targets) and `samples` rows, in a step
    whose micro-batches over all processes hold `global_tokens` and `global_samples` (see the module docstring).

    normalize_by: the method's distillation normaliser, "tokens" or "samples" (CE is always per token).
    alpha: the CE share of the loss; distills: whether the method has a distillation term (a teacher).
    ce_scale: a factor on the CE term (on-policy micro-batches); world_size: the number of processes.

    >>> w = micro_batch_weights(3, 1, 12, 4, normalize_by="samples", alpha=0.5, distills=True, world_size=2)
    >>> (w.ce_share, w.distill_share, w.backward_scale)
    (0.25, 0.25, 2)
    """
    if normalize_by not in NORMALIZATIONS:
        raise ValueError(f"normalize_by: expected one of {', '.join(NORMALIZATIONS)}, got {normalize_by!r}")
    ce_share = tokens / global_tokens
    distill_share = ce_share if normalize_by == "tokens" else samples / global_samples
    return MicroBatchWeights(ce_share, distill_share, alpha, ce_scale, distills, world_size)


def unit_weights(alpha: float, distills: bool) -> MicroBatchWeights:
    """Weights that only mix the terms (`alpha * CE + (1 - alpha) * distill`): for a caller that averages over
    micro-batches and processes itself, like the Hugging Face Trainer."""
    return MicroBatchWeights(1.0, 1.0, alpha, 1.0, distills, 1)


GRADMAG_EPSILON = 1e-8  # tokenkit's, added to each gradient norm


def gradmag_alpha(ce: torch.Tensor, distill: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> float | None:
    """GradMag loss balancing (Minixhofer et al. 2025, arXiv 2503.20083; tokenkit's
    `multitask_aggregation_fn=approx_gradmag_preserve_mag`): weight each term by the inverse norm of its gradient on
    `params` (the student's last block, a cheap stand-in for the whole model), the weights normalised to sum 1:

        n_i = ||d L_i / d params|| + 1e-8,   w_i = 1 / n_i,   loss = (w_ce CE + w_d distill) / (w_ce + w_d)

    so on those parameters both terms pull with the same magnitude and the loss keeps the scale of one term. That is
    `alpha * CE + (1 - alpha) * distill` with the returned alpha = w_ce / (w_ce + w_d) = n_d / (n_ce + n_d), treated as
    a constant (no gradient flows through the weights). A term whose gradient there is exactly zero (none reaches
    `params`) has nothing to balance and gets weight 0. None when neither term has a gradient (no autograd graph:
    evaluation under `torch.no_grad`), for the caller to fall back on its fixed alpha.

    Costs two extra backward passes from the losses to `params` (through the LM head, not the rest of the model); the
    graph is kept for the step's own backward. (SRA's fused CE + span KL node recomputes its KL gradient for that
    backward once the probes have used its stored one: `losses/logit_losses.py`.)
    """
    params = [p for p in params if p.requires_grad]
    norms = []
    for term in (ce, distill):
        if not term.requires_grad:
            norms.append(None)
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().square().sum() for g in grads if g is not None]
        norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
    ce_norm, distill_norm = norms
    if ce_norm is None and distill_norm is None:
        return None
    if not ce_norm:  # None or 0: only the distillation term reaches the parameters
        return 0.0 if distill_norm else None
    if not distill_norm:
        return 1.0
    ce_weight, distill_weight = 1.0 / (ce_norm + GRADMAG_EPSILON), 1.0 / (distill_norm + GRADMAG_EPSILON)
    return ce_weight / (ce_weight + distill_weight)

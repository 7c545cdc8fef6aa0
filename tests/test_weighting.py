"""The step's weighting (`train/weighting.py`) against plain arithmetic: shares of the global counts, alpha, the
on-policy CE scale, the world size, and that the weighted micro-batches of a step add up to one big batch's means."""

import doctest

import pytest
import torch

from sra_distill.train import weighting
from sra_distill.train.weighting import micro_batch_weights, unit_weights


def test_token_normalised_method_weights_both_terms_by_tokens():
    w = micro_batch_weights(30, 2, 120, 8, normalize_by="tokens", alpha=0.25, distills=True, world_size=4)
    assert (w.ce_share, w.distill_share, w.backward_scale) == (0.25, 0.25, 4)
    assert float(w.loss(torch.tensor(2.0), torch.tensor(8.0))) == pytest.approx(2.0 * 0.25 * 0.25 + 0.75 * 8.0 * 0.25)


def test_sample_normalised_method_weights_distillation_by_samples_and_ce_by_tokens():
    w = micro_batch_weights(30, 2, 120, 8, normalize_by="samples", alpha=0.5, distills=True)
    assert (w.ce_share, w.distill_share) == (30 / 120, 2 / 8)
    w = micro_batch_weights(30, 6, 120, 8, normalize_by="samples", alpha=0.5, distills=True)
    assert (w.ce_share, w.distill_share) == (30 / 120, 6 / 8)
    assert float(w.loss(torch.tensor(4.0), torch.tensor(1.0))) == pytest.approx(4.0 * 0.25 * 0.5 + 0.5 * 1.0 * 0.75)
    assert (w.share("ce"), w.share("distill"), w.share("geo")) == (0.25, 0.75, 0.75)


def test_without_a_teacher_the_loss_is_the_weighted_ce_without_alpha():
    w = micro_batch_weights(10, 1, 40, 4, normalize_by="tokens", alpha=0.3, distills=False)
    assert float(w.loss(torch.tensor(2.0))) == pytest.approx(2.0 * 10 / 40)


@pytest.mark.parametrize("scale", [0.0, 1.0, 0.5])
def test_on_policy_scale_multiplies_only_the_ce_term(scale):
    w = micro_batch_weights(10, 2, 20, 4, normalize_by="samples", alpha=0.5, distills=True, ce_scale=scale)
    expected = 3.0 * 0.5 * 0.5 * scale + 0.5 * 5.0 * 0.5
    assert float(w.loss(torch.tensor(3.0), torch.tensor(5.0))) == pytest.approx(expected)


def test_micro_batches_of_a_step_add_up_to_the_global_means():
    """Per-token CE and per-sample distillation losses of 3 uneven micro-batches, weighted, equal the means over
    all their tokens and samples taken at once."""
    gen = torch.Generator().manual_seed(0)
    token_losses = [torch.rand(n, generator=gen) for n in (5, 9, 2)]
    sample_losses = [torch.rand(n, generator=gen) for n in (1, 3, 2)]
    global_tokens, global_samples = 16, 6
    total = torch.tensor(0.0)
    for tok, smp in zip(token_losses, sample_losses):
        w = micro_batch_weights(torch.tensor(float(len(tok))), torch.tensor(float(len(smp))), global_tokens,
                                global_samples, normalize_by="samples", alpha=0.4, distills=True)
        total = total + w.loss(tok.mean(), smp.mean())
    expected = 0.4 * torch.cat(token_losses).mean() + 0.6 * torch.cat(sample_losses).mean()
    torch.testing.assert_close(total, expected)


def test_unit_weights_only_mix_the_terms():
    w = unit_weights(0.5, distills=True)
    assert float(w.loss(torch.tensor(2.0), torch.tensor(4.0))) == 0.5 * 2.0 + 0.5 * 4.0
    assert w.backward_scale == 1
    assert float(unit_weights(0.5, distills=False).loss(torch.tensor(2.0))) == 2.0


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalize_by"):
        micro_batch_weights(1, 1, 1, 1, normalize_by="sequences", alpha=0.5, distills=True)


def test_docstring_example_holds():
    result = doctest.testmod(weighting)
    assert result.failed == 0 and result.attempted > 0


def two_terms():
    """A tiny two-layer model and two losses of its output that pull its last layer with very different strength."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    out = model(torch.randn(5, 4))
    return model, out.square().mean() * 50.0, (out[:, 0] - 1.0).abs().mean()


def norm_of(term, params):
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(term, params, retain_graph=True)]).norm())


def test_gradmag_alpha_gives_both_terms_the_same_pull_on_the_measured_parameters():
    model, ce, distill = two_terms()
    last = list(model[2].parameters())
    alpha = weighting.gradmag_alpha(ce, distill, last)
    ce_norm, distill_norm = norm_of(ce, last), norm_of(distill, last)
    assert ce_norm > 10 * distill_norm  # unbalanced to start with
    # tokenkit's preserve-magnitude weights: w_i = 1 / (n_i + eps), normalised to sum 1
    w_ce, w_d = 1 / (ce_norm + 1e-8), 1 / (distill_norm + 1e-8)
    assert alpha == pytest.approx(w_ce / (w_ce + w_d), rel=1e-6)
    assert norm_of(alpha * ce, last) == pytest.approx(norm_of((1 - alpha) * distill, last), rel=1e-5)
    # the graph survives for the step's own backward
    (alpha * ce + (1 - alpha) * distill).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradmag_alpha_where_a_term_has_no_gradient():
    model, ce, distill = two_terms()
    last = list(model[2].parameters())
    assert weighting.gradmag_alpha(ce, distill.detach(), last) == 1.0  # only the CE reaches the parameters
    assert weighting.gradmag_alpha(ce.detach(), distill, last) == 0.0
    assert weighting.gradmag_alpha(ce.detach(), distill.detach(), last) is None  # no graph: the caller's alpha
    # a term that does not reach the measured parameters (here: a loss of the first layer's weights alone)
    assert weighting.gradmag_alpha(model[0].weight.square().sum(), distill, last) == 0.0

"""SRA: Span Representation Alignment (Dao et al., ACL 2026, arXiv 2605.01205; the working specification,
`../shared/docs/sra-method.md` beside the checkout, sec. 2-3).

Teacher and student read the same text with different tokenizers; spans are the finest segmentation both
tokenizations share (span ids come from the data pipeline). Per model, per sample b and span k:

    m_t   = attention token t receives from the last non-pad token, summed over heads, sum_t m_t = 1 (no grad)
    M_k   = sum_{t in k} m_t
    C_k   = sum_{t in k} m_t h_t / max(M_k, 1e-5)          (ablation: plain mean of h_t over the span)

Weights (teacher masses only, over the sample's real spans):

    w_k   = M^T_k / sum_k' M^T_k'                          (ablation: w_k = 1 / K_b)
    pi_ij = w_i w_j / sum_{a != b} w_a w_b   for i != j,  0 on the diagonal

Losses, B = batch size:

    L_cos = (1/B) sum_b sum_k w_bk (1 - cos(P(C^S_bk), C^T_bk))               P: learned Linear(d_S, d_T)
    L_geo = (1/B) sum_b sum_{i!=j} pi_bij (cos(C^S_bi, C^S_bj) - cos(C^T_bi, C^T_bj))^2
    L_kl  = (1/B) sum_b sum_k KL(softmax(z^T_bk / tau) || softmax(z^S_bk / tau))   (no tau^2)
    span total = gamma L_cos + lambda L_geo + L_kl

`kl_normalization="mean"` (not the paper's; `SRAConfig`) divides L_kl by the batch's aligned spans instead of B;
`"tokens"` by the student tokens those spans cover (the CE's unit).

z_bk = the model's own LM head applied to its own C_bk, restricted to the shared vocabulary (`vocab.py`).
Everything is computed in float32; gradients reach the student's hidden states, head and the projector only.

One path computes all of it: `pair_spans` pools a layer pair's centres and weights, `sra_terms` builds L_cos (mean
over the pairs), L_geo and L_kl (the last pair) and combines them once; `sra_loss` is that for one pair as a plain
function, `SRALoss` (the method) for the configured layer pairs, each with masses from its own attention layer.
L_kl runs through `losses/fused_span_kl.py` (chunked, backward written out, the head applied to the centres). With a
bias-free student head whose input is the last pair's student layer, z^S_k = sum_{t in k} (m_t / max(M_k, 1e-5))
z_t[shared] (the head is linear): then `logit_losses.ce_and_span_kl` computes L_kl from the student's token logits in
one node with the student's CE, and the method returns that CE too (`losses/base.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sra_distill.data.batch import ModelView, PairedBatch, last_real_position
from sra_distill.data.vocab import SharedVocab, shared_vocab
from sra_distill.errors import ModelSourceError
from sra_distill.fields import SettingError, setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs
from sra_distill.losses.fused_span_kl import SharedHead, span_kl
from sra_distill.losses.logit_losses import SpanTokens, ce_and_span_kl

MASS_FLOOR = 1e-5  # the paper's max(M_k, 1e-5) in the CoM denominator
_TINY = torch.finfo(torch.float32).tiny  # guards divisions whose numerator is zero whenever the denominator is

Projector = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def token_mass(attention: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mass m_t [B, T] each token receives from the last non-pad token, summed over heads, 0 on pad, sum 1.

    attention: full maps [B, H, T, T] (query x key), the last non-pad token's row per head [B, H, T], or that row
    already summed over heads [B, T]. attention_mask: [B, T], 1 = real token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    batch, seq_len = attention_mask.shape
    expected = {4: (batch, None, seq_len, seq_len), 3: (batch, None, seq_len), 2: (batch, seq_len)}.get(attention.dim())
    if expected is None or any(e is not None and e != s for e, s in zip(expected, attention.shape)):
        raise ValueError(
            f"attention must be [B, H, T, T], [B, H, T] or [B, T] with B={batch}, T={seq_len} from the mask, "
            f"got shape {tuple(attention.shape)}"
        )
    row = attention.detach().float()
    if row.dim() == 4:
        if not bool(attention_mask.bool().any(dim=-1).all()):
            raise ValueError("attention_mask has a row with no real token (all zeros)")
        row = row[torch.arange(batch, device=row.device), :, last_real_position(attention_mask), :]
    if row.dim() == 3:
        row = row.sum(dim=1)
    row = row * attention_mask.to(row.dtype)
    return row / row.sum(dim=-1, keepdim=True).clamp_min(_TINY)


@dataclass(frozen=True)
class SpanPooling:
    """How one side's tokens pool into span centres, C_k = sum_{t in k} a_t h_t, over [B, T] tokens and K spans.

    a_t = m_t / max(M_k, 1e-5) (weighted) or 1 / |k| (plain mean), 0 outside spans. A span is valid when
    k < num_spans[b] and it has at least one token on this side.
    """

    slot: torch.Tensor  # [B*T] b * K + span id (tokens outside spans: b * K, with a_t = 0)
    in_span: torch.Tensor  # [B*T] bool
    weights: torch.Tensor  # [B*T] a_t, float32
    span_mass: torch.Tensor  # [B, K] M_k, the mass sum either way (the loss weights use it)
    valid: torch.Tensor  # [B, K] bool

    def centers(self, hidden: torch.Tensor) -> torch.Tensor:
        """C [B, K, D] float32 from hidden [B, T, D]."""
        batch, k_max = self.valid.shape
        pooled = hidden.float().reshape(-1, hidden.shape[-1]) * self.weights[:, None]
        sums = torch.zeros(batch * k_max, hidden.shape[-1], device=hidden.device).index_add(0, self.slot, pooled)
        return sums.reshape(batch, k_max, -1)

    def tokens(self, valid: torch.Tensor) -> SpanTokens:
        """The tokens of the spans marked in `valid` [B, K] (a subset of this side's), numbered in row-major order
        of `valid` (as `centers[valid]`), with their weights a_t."""
        flat_valid = valid.reshape(-1)
        positions = torch.nonzero(self.in_span & flat_valid[self.slot]).squeeze(1)
        spans = (flat_valid.long().cumsum(0) - 1)[self.slot[positions]]
        order = torch.argsort(spans, stable=True)  # spans are contiguous runs already; sorting makes it a guarantee
        return SpanTokens(positions[order], spans[order], self.weights[positions[order]], int(flat_valid.sum()))


def span_pooling(
    mass: torch.Tensor, span_ids: torch.Tensor, num_spans: torch.Tensor | int, weighted: bool = True
) -> SpanPooling:
    """`SpanPooling` of one side: mass [B, T] (from `token_mass`), span_ids [B, T] (-1 outside spans), num_spans [B]
    (or one count for all), K = the largest."""
    if mass.shape != span_ids.shape:
        raise ValueError(f"mass {tuple(mass.shape)} and span_ids {tuple(span_ids.shape)} must both be [B, T]")
    batch = span_ids.shape[0]
    num_spans = torch.as_tensor(num_spans, device=span_ids.device).expand(batch)
    # At least one slot: a batch without spans then gives invalid zero centres that still hang off `hidden`.
    k_max = max(1, int(num_spans.max()) if batch else 0)
    in_span = span_ids >= 0
    if bool((in_span & (span_ids >= num_spans[:, None])).any()):
        raise ValueError("span_ids holds an id >= the sample's number of spans")
    # Every token scatters into slot b*K + span; tokens outside spans go to slot b*K with weight 0 (no sync/masking).
    slot = (torch.arange(batch, device=span_ids.device)[:, None] * k_max + span_ids.clamp_min(0)).reshape(-1)
    member = in_span.float().reshape(-1)
    token_mass_in_span = mass.detach().float().reshape(-1) * member
    span_mass = torch.zeros(batch * k_max, device=span_ids.device).index_add(0, slot, token_mass_in_span)
    count = torch.zeros(batch * k_max, device=span_ids.device).index_add(0, slot, member)
    if weighted:
        weights = token_mass_in_span / span_mass.clamp_min(MASS_FLOOR)[slot]
    else:
        weights = member / count.clamp_min(1.0)[slot]
    valid = (count.reshape(batch, k_max) > 0) & (torch.arange(k_max, device=span_ids.device) < num_spans[:, None])
    return SpanPooling(slot, in_span.reshape(-1), weights, span_mass.reshape(batch, k_max), valid)


def span_centers(
    hidden: torch.Tensor,
    mass: torch.Tensor,
    span_ids: torch.Tensor,
    num_spans: torch.Tensor | int,
    weighted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Span centres of mass C [B, K, D] (float32), span masses M [B, K] and validity [B, K] (`SpanPooling`)."""
    if hidden.shape[:2] != span_ids.shape:
        raise ValueError(f"span_ids {tuple(span_ids.shape)} must match hidden's [B, T] = {tuple(hidden.shape[:2])}")
    pooling = span_pooling(mass, span_ids, num_spans, weighted)
    return pooling.centers(hidden), pooling.span_mass, pooling.valid


def span_weights(teacher_span_mass: torch.Tensor, valid: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """w [B, K]: teacher span masses renormalised over each sample's valid spans (uniform 1/K_b if not weighted)."""
    base = teacher_span_mass.detach().float() if weighted else torch.ones_like(teacher_span_mass, dtype=torch.float32)
    base = base * valid
    return base / base.sum(dim=-1, keepdim=True).clamp_min(_TINY)


def pair_weights(weights: torch.Tensor) -> torch.Tensor:
    """pi [B, K, K] = w_i w_j / sum_{a != b} w_a w_b off the diagonal, 0 on it (all 0 with fewer than 2 spans)."""
    outer = weights[:, :, None] * weights[:, None, :]
    outer = outer * (1.0 - torch.eye(weights.shape[-1], device=weights.device))
    return outer / outer.sum(dim=(1, 2), keepdim=True).clamp_min(_TINY)


def alignment_loss(
    projected_student: torch.Tensor, teacher_centers: torch.Tensor, weights: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """L_cos = (1/B) sum_b sum_k w_bk (1 - cos(P(C^S_bk), C^T_bk))."""
    cosine = F.cosine_similarity(projected_student.float(), teacher_centers.float(), dim=-1)
    return (weights * (1.0 - cosine)).sum() / batch_size


def _cosine_matrix(centers: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(centers, dim=-1)
    return unit @ unit.transpose(1, 2)


def geometry_loss(
    student_centers: torch.Tensor, teacher_centers: torch.Tensor, weights: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """L_geo = (1/B) sum_b sum_{i!=j} pi_bij (cos(C^S_bi, C^S_bj) - cos(C^T_bi, C^T_bj))^2, each side in its space."""
    difference = _cosine_matrix(student_centers.float()) - _cosine_matrix(teacher_centers.float())
    return (pair_weights(weights) * difference.square()).sum() / batch_size


def spans_in_batch(student_span_ids: torch.Tensor, teacher_span_ids: torch.Tensor) -> torch.Tensor:
    """[B] number of spans per sample when only span ids are known: 1 + the largest id on either side."""
    largest = torch.maximum(student_span_ids.max(dim=-1).values, teacher_span_ids.max(dim=-1).values)
    return (largest + 1).clamp_min(0)


KL_NORMALIZATIONS = ("sum", "mean", "tokens")


def kl_divisor(valid: torch.Tensor, normalization: str, student_span_ids: torch.Tensor) -> int:
    """What the summed span KL is divided by: the batch size B ("sum": the paper's sum over spans per sample), the
    number of aligned spans in the batch ("mean": a mean over spans, about 1/55 of the paper's scale at 192 tokens on
    the default pair; benchmarks/results/sra_study.md), or the number of student tokens those spans cover ("tokens":
    the CE's own unit, a mean over the response tokens that carry a span KL). valid [B, K], student_span_ids [B, T]."""
    if normalization == "sum":
        return valid.shape[0]
    if normalization == "mean":
        return max(1, int(valid.sum()))
    if normalization == "tokens":
        in_span = student_span_ids >= 0
        covered = in_span & valid.gather(1, student_span_ids.clamp(min=0, max=valid.shape[1] - 1))
        return max(1, int(covered.sum()))
    raise ValueError(f"kl_normalization must be one of {', '.join(KL_NORMALIZATIONS)}, got {normalization!r}")


@dataclass(frozen=True)
class PairSpans:
    """One layer pair's aligned spans: centres per side (the teacher's without gradient), the spans both sides
    have (`valid`), their weights w, and how the student's tokens pool into its centres."""

    student_centers: torch.Tensor  # [B, K, d_S]
    teacher_centers: torch.Tensor  # [B, K, d_T]
    valid: torch.Tensor  # [B, K]
    weights: torch.Tensor  # [B, K]
    student_pooling: SpanPooling
    student_span_ids: torch.Tensor  # [B, T_S]


class SideSpans(NamedTuple):
    """One model's side of a layer pair: hidden states [B, T, D], token masses [B, T] (`token_mass`), span ids
    [B, T] (-1 outside spans)."""

    hidden: torch.Tensor
    mass: torch.Tensor
    span_ids: torch.Tensor


def pair_spans(student: SideSpans, teacher: SideSpans, num_spans: torch.Tensor | None, config: SRAConfig) -> PairSpans:
    """Centres and weights of one layer pair; num_spans [B] defaults to 1 + the largest span id of each sample."""
    if student.hidden.shape[0] != teacher.hidden.shape[0]:
        raise ValueError(f"batch sizes differ: student {student.hidden.shape[0]}, teacher {teacher.hidden.shape[0]}")
    for name, side in (("student", student), ("teacher", teacher)):
        if side.hidden.shape[:2] != side.span_ids.shape:
            raise ValueError(f"{name} span_ids {tuple(side.span_ids.shape)} must match its hidden states' [B, T] = "
                             f"{tuple(side.hidden.shape[:2])}")
    if num_spans is None:
        num_spans = spans_in_batch(student.span_ids, teacher.span_ids)
    student_pooling = span_pooling(student.mass, student.span_ids, num_spans, config.weighted_pooling)
    teacher_pooling = span_pooling(teacher.mass, teacher.span_ids, num_spans, config.weighted_pooling)
    with torch.no_grad():
        teacher_centers = teacher_pooling.centers(teacher.hidden.detach())
    valid = student_pooling.valid & teacher_pooling.valid
    return PairSpans(student_pooling.centers(student.hidden), teacher_centers, valid,
                     span_weights(teacher_pooling.span_mass, valid, config.weighted_loss), student_pooling,
                     student.span_ids)


def sra_terms(
    pairs: list[PairSpans],
    projectors: list[Projector],
    heads: tuple[SharedHead, SharedHead] | None,
    config: SRAConfig,
    student_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The SRA loss of aligned layer pairs: scalar `cos` (mean of L_cos over the pairs, each with its projector; 0
    without projectors), `geo` and `kl` (the last pair; `kl` 0 without heads), and `total` = cos_weight cos +
    geo_weight geo + kl. config.use_cos / use_geo / use_kl switch a term off (0).

    heads: (student, teacher) LM heads restricted to the shared vocabulary. student_logits: (logits [B, T, V], labels
    [B, T]), given only when the logits are the student's bias-free head applied to the last pair's student hidden
    states: then L_kl reads its span logits from them in one node with the student's CE, returned as `ce` (same
    values and gradients as the CE and the head on the centres).
    """
    last = pairs[-1]
    batch_size = last.valid.shape[0]
    zero = torch.zeros((), device=last.valid.device)
    cos_terms = [alignment_loss(project(pair.student_centers), pair.teacher_centers, pair.weights, batch_size)
                 for pair, project in zip(pairs, projectors if config.use_cos else [])]
    cos = torch.stack(cos_terms).mean() if cos_terms else zero
    geo = zero
    if config.use_geo:
        geo = geometry_loss(last.student_centers, last.teacher_centers, last.weights, batch_size)
    kl, ce = zero, {}
    if heads is not None and config.use_kl:
        divisor = kl_divisor(last.valid, config.kl_normalization, last.student_span_ids)
        if student_logits is not None:
            logits, labels = student_logits
            ce["ce"], kl = ce_and_span_kl(logits, labels, last.student_pooling.tokens(last.valid), heads[0].rows,
                                          last.teacher_centers[last.valid], heads[1], config.temperature, divisor)
        else:
            kl = span_kl(last.student_centers[last.valid], heads[0], last.teacher_centers[last.valid], heads[1],
                         config.temperature, divisor)
    return {"cos": cos, "geo": geo, "kl": kl, "total": config.cos_weight * cos + config.geo_weight * geo + kl, **ce}


def sra_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_mass: torch.Tensor,
    teacher_mass: torch.Tensor,
    student_span_ids: torch.Tensor,
    teacher_span_ids: torch.Tensor,
    projector: Projector | None = None,
    student_head: SharedHead | None = None,
    teacher_head: SharedHead | None = None,
    *,
    num_spans: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    config: SRAConfig | None = None,
) -> dict[str, torch.Tensor]:
    """The SRA span losses of one layer pair: scalar `cos`, `geo`, `kl` and `span_total` (see module docstring).

    hidden [B, T, D] per side, mass [B, T] (from `token_mass`), span_ids [B, T] (-1 outside spans), projector maps
    student CoMs [.., d_S] to [.., d_T] (None: `cos` is 0). student_head / teacher_head: each model's LM head
    restricted to the shared vocabulary (`SharedHead(weight, bias, shared ids)`); without them `kl` is 0.
    num_spans [B] defaults to 1 + the largest span id of each sample. student_logits [B, T, V] and labels [B, T]
    (both or neither): the student's bias-free head applied to student_hidden, and the CE's labels; then `kl` is read
    from the logits in one node with their CE, returned as `ce` (`sra_terms`). config: the weights, temperature,
    pooling and KL normalisation (`SRAConfig`, default the paper's).
    """
    config = SRAConfig() if config is None else config
    if (student_head is None) != (teacher_head is None):
        raise ValueError("give both student_head and teacher_head, or neither")
    if (student_logits is None) != (labels is None):
        raise ValueError("give student_logits and labels together, or neither")
    spans = pair_spans(SideSpans(student_hidden, student_mass, student_span_ids),
                       SideSpans(teacher_hidden, teacher_mass, teacher_span_ids), num_spans, config)
    heads = None if student_head is None else (student_head, teacher_head)
    fused = None if student_logits is None else (student_logits, labels)
    terms = sra_terms([spans], [] if projector is None else [projector], heads, config, fused)
    extra = {"ce": terms["ce"]} if "ce" in terms else {}
    return {"cos": terms["cos"], "geo": terms["geo"], "kl": terms["kl"], "span_total": terms["total"], **extra}


PROJECTOR_INITS = ("default", "xavier")


@dataclass
class SRAConfig(MethodConfig):
    """Settings of the SRA method (defaults = the paper's reference)."""

    method_names: ClassVar[tuple[str, ...]] = ("sra",)

    cos_weight: float = setting(1.0, ge=0)  # gamma, weight of L_cos
    geo_weight: float = setting(50.0, ge=0)  # lambda, weight of L_geo (10 in some of the authors' scripts)
    temperature: float = setting(2.0, gt=0)  # tau of the span KL
    # The span KL's normalisation: "sum" over a sample's spans, averaged over samples (the paper's L_kl); "mean" over
    # all aligned spans of the batch; "tokens" over the student tokens those spans cover (the CE's unit). The last
    # two are not the paper's: departures studied in benchmarks/results/sra_study.md.
    kl_normalization: str = setting("sum", choices=KL_NORMALIZATIONS)
    weighted_pooling: bool = True  # CoM with attention masses; False = plain mean over the span (ablation)
    weighted_loss: bool = True  # w_k from teacher span masses; False = uniform 1/K (ablation)
    use_cos: bool = True  # L_cos enters `distill` (the use_* switches are ablations)
    use_geo: bool = True  # L_geo enters `distill`
    use_kl: bool = True  # L_kl enters `distill`
    # Layer pairs aligned by L_cos (equal weights); L_geo and L_kl use the last pair. Each entry is
    # [student layer, teacher layer] or [student layer, teacher layer, student attention block, teacher attention
    # block]. Layers follow `ModelView.hidden`: 0..num_layers-1 = block outputs, num_layers = final-norm output;
    # negative counts from the end, so -1 = final-norm output, -2 = the last block's output. Token masses (CoM
    # weights, span weights w) of a pair come from its attention block: by default the block that produced the pair's
    # states (block i for block i's output, the last block for the final-norm output), as the authors' SRAv4 scripts.
    layer_pairs: list[tuple[int, ...]] = field(default_factory=lambda: [(-1, -1)])
    # One attention block for the masses of every pair (negative counts from the end, -1 = last block), overriding
    # the per-pair default; null = each pair's own (above).
    attention_layer_student: int | None = None
    attention_layer_teacher: int | None = None  # likewise for the teacher's token masses; null = each pair's own
    projector_bias: bool = True  # the projector P of L_cos has a bias (the SRAv4 scripts: none)
    projector_init: str = setting("default", choices=PROJECTOR_INITS)  # "default" (torch Linear: Kaiming-uniform) or "xavier" (Xavier-uniform, bias 0)
    # Span KL from the student's token logits, in one node with its CE, when its head has no bias and the last pair's
    # student layer is the head's input (same values and gradients, no product of the centres with the head;
    # `losses/logit_losses.py`); false = always the head applied to the centres.
    reuse_student_logits: bool = True
    projector_lr: float = setting(5e-4, gt=0)  # learning rate of the projectors
    normalize_vocab: bool = True  # shared vocabulary by the bytes tokens stand for (Ġ/▁/<0xNN> decoded); false = exact string match as the paper (wrong across byte-level BPE and SentencePiece: Llama-2 "é" would pair with byte-level "é", which stands for the lone byte E9)

    def build(self, context: MethodContext) -> SRALoss:
        shared = shared_vocab(
            context.student_tokenizer, context.teacher_tokenizer, normalize=self.normalize_vocab,
            student_rows=context.student_vocab_rows, teacher_rows=context.teacher_vocab_rows,
        )
        return SRALoss(self, context.student_dim, context.teacher_dim, shared, context.student_num_layers,
                       context.teacher_num_layers)

    def __post_init__(self) -> None:
        self.layer_pairs = [tuple(pair) for pair in self.layer_pairs]  # lists when built in code rather than loaded
        super().__post_init__()

    def check(self) -> None:
        if not self.layer_pairs or any(len(pair) not in (2, 4) for pair in self.layer_pairs):
            raise SettingError("layer_pairs", f"must be a non-empty list of [student, teacher] or [student, teacher, "
                               f"student attention, teacher attention] entries, got {self.layer_pairs}")
        if not (self.use_cos or self.use_geo or self.use_kl):
            raise SettingError("use_kl", "SRA with use_cos, use_geo and use_kl all False distils nothing")


def _resolve(index: int, count: int, what: str, key: str) -> int:
    """Python-style index into range(count) -> non-negative index; out of range: a SettingError naming `key` (the
    models' depths are known only once they load, so this range is checked here)."""
    if not -count <= index < count:
        raise SettingError(key, f"{what} index {index} is out of range for {count} entries")
    return index % count


def own_attention_block(hidden_layer: int, num_layers: int) -> int:
    """The block whose attention belongs with hidden layer `hidden_layer` (resolved, 0..num_layers): the block that
    produced it; the final-norm output (num_layers) belongs to the last block."""
    return min(hidden_layer, num_layers - 1)


class SRALoss(DistillMethod):
    """SRA as a method (contract in `losses/base.py`): owns one projector Linear(d_S, d_T) per layer pair."""

    def __init__(
        self,
        config: SRAConfig,
        student_dim: int,
        teacher_dim: int,
        shared: SharedVocab | None,
        student_num_layers: int,
        teacher_num_layers: int,
    ) -> None:
        super().__init__()
        if config.use_kl and (shared is None or shared.size == 0):
            raise ModelSourceError("SRA's span KL (methods.sra.use_kl=true) needs a shared vocabulary, and the two "
                                   "tokenizers share no token (data.vocab.shared_vocab)")
        self.config = config
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.student_num_layers, self.teacher_num_layers = student_num_layers, teacher_num_layers
        # Hidden layers: num_layers + 1 entries (blocks, then the final norm); attention: one per block.
        self.layer_pairs = [
            (_resolve(pair[0], student_num_layers + 1, "student layer", "methods.sra.layer_pairs"),
             _resolve(pair[1], teacher_num_layers + 1, "teacher layer", "methods.sra.layer_pairs"))
            for pair in config.layer_pairs
        ]
        # (student block, teacher block) whose attention gives each pair's token masses.
        self.attention_pairs = []
        for pair, (student_layer, teacher_layer) in zip(config.layer_pairs, self.layer_pairs):
            student_block = own_attention_block(student_layer, student_num_layers)
            teacher_block = own_attention_block(teacher_layer, teacher_num_layers)
            if len(pair) == 4:
                student_block, teacher_block = pair[2], pair[3]
            if config.attention_layer_student is not None:
                student_block = config.attention_layer_student
            if config.attention_layer_teacher is not None:
                teacher_block = config.attention_layer_teacher
            self.attention_pairs.append((
                _resolve(student_block, student_num_layers, "student attention",
                         "methods.sra.attention_layer_student (or layer_pairs)"),
                _resolve(teacher_block, teacher_num_layers, "teacher attention",
                         "methods.sra.attention_layer_teacher (or layer_pairs)"),
            ))
        # Without L_cos the projectors would be unused parameters (a problem for DDP), so none are built.
        pairs_with_projector = len(self.layer_pairs) if config.use_cos else 0
        self.projectors = nn.ModuleList(
            self._projector(student_dim, teacher_dim, config) for _ in range(pairs_with_projector)
        )
        rows = shared if config.use_kl else None
        self.register_buffer("student_rows", None if rows is None else rows.student_ids.clone(), persistent=False)
        self.register_buffer("teacher_rows", None if rows is None else rows.teacher_ids.clone(), persistent=False)

    @staticmethod
    def _projector(student_dim: int, teacher_dim: int, config: SRAConfig) -> nn.Linear:
        projector = nn.Linear(student_dim, teacher_dim, bias=config.projector_bias)
        if config.projector_init == "xavier":
            nn.init.xavier_uniform_(projector.weight)
            if projector.bias is not None:
                nn.init.zeros_(projector.bias)
        return projector

    @property
    def _student_needs_mass(self) -> bool:
        return self.config.weighted_pooling

    @property
    def _teacher_needs_mass(self) -> bool:
        return self.config.weighted_pooling or self.config.weighted_loss

    def needs(self) -> Needs:
        return Needs(
            student_hidden_layers=tuple(sorted({s for s, _ in self.layer_pairs})),
            teacher_hidden_layers=tuple(sorted({t for _, t in self.layer_pairs})),
            student_attention_layers=tuple(sorted({s for s, _ in self.attention_pairs}))
            if self._student_needs_mass else (),
            teacher_attention_layers=tuple(sorted({t for _, t in self.attention_pairs}))
            if self._teacher_needs_mass else (),
            teacher_logits=False,
            normalize_by="samples",  # every SRA term is divided by the batch size
        )

    @staticmethod
    def _layer(table: dict[int, torch.Tensor], layer: int, side: str, what: str) -> torch.Tensor:
        if layer not in table:
            raise KeyError(f"{side} {what} for layer {layer} was not captured; captured: {sorted(table)}")
        return table[layer]

    def _mass(self, view: ModelView, mask: torch.Tensor, layer: int, needed: bool, side: str) -> torch.Tensor:
        if not needed:  # mean pooling and uniform weights never read the masses
            return token_mass(mask.float(), mask)
        return token_mass(self._layer(view.attention_row, layer, side, "attention row"), mask)

    def _project(self, pair_index: int) -> Projector:
        projector = self.projectors[pair_index]
        return lambda centers: projector(centers.to(projector.weight.dtype))

    def _heads(self, student: ModelView, teacher: ModelView) -> tuple[SharedHead, SharedHead] | None:
        if not self.config.use_kl:
            return None
        return (SharedHead(student.lm_head_weight, student.lm_head_bias, self.student_rows),
                SharedHead(teacher.lm_head_weight, teacher.lm_head_bias, self.teacher_rows))

    def _reusable_logits(self, student: ModelView) -> torch.Tensor | None:
        """The student's token logits when they are its bias-free head applied to the last pair's student layer."""
        reusable = (self.config.reuse_student_logits and student.logits_from_head and student.lm_head_bias is None
                    and self.layer_pairs[-1][0] == self.student_num_layers)
        return student.logits if reusable else None

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        """`sra_terms` of the configured layer pairs: L_cos of every pair (mean), L_geo and L_kl of the last pair."""
        student_masses: dict[int, torch.Tensor] = {}
        teacher_masses: dict[int, torch.Tensor] = {}
        pairs = []
        for (student_layer, teacher_layer), (student_block, teacher_block) in zip(self.layer_pairs,
                                                                                  self.attention_pairs):
            if student_block not in student_masses:
                student_masses[student_block] = self._mass(
                    student, batch.student.attention_mask, student_block, self._student_needs_mass, "student"
                )
            if teacher_block not in teacher_masses:
                teacher_masses[teacher_block] = self._mass(
                    teacher, batch.teacher.attention_mask, teacher_block, self._teacher_needs_mass, "teacher"
                )
            student_hidden = self._layer(student.hidden, student_layer, "student", "hidden states")
            teacher_hidden = self._layer(teacher.hidden, teacher_layer, "teacher", "hidden states")
            if student_hidden.shape[-1] != self.student_dim or teacher_hidden.shape[-1] != self.teacher_dim:
                raise ValueError(
                    f"hidden sizes {student_hidden.shape[-1]}/{teacher_hidden.shape[-1]} (student/teacher) differ "
                    f"from the projector's {self.student_dim}/{self.teacher_dim}"
                )
            pairs.append(pair_spans(SideSpans(student_hidden, student_masses[student_block], batch.student.span_ids),
                                    SideSpans(teacher_hidden, teacher_masses[teacher_block], batch.teacher.span_ids),
                                    batch.num_spans, self.config))
        projectors = [self._project(index) for index in range(len(self.projectors))]
        logits = self._reusable_logits(student)
        terms = sra_terms(pairs, projectors, self._heads(student, teacher), self.config,
                          None if logits is None else (logits, batch.student.labels))
        ce = {"ce": terms["ce"]} if "ce" in terms else {}  # the CE computed with the span KL (losses/base.py)
        return {"distill": terms["total"], "cos": terms["cos"], "geo": terms["geo"], "kl": terms["kl"], **ce}

"""ALM: Approximate Likelihood Matching (Minixhofer, Vulić and Ponti, "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching", NeurIPS 2025, arXiv 2503.20083; code github.com/bminixhofer/tokenkit,
`tokenkit/training/losses.py` `compute_alm_loss`, defaults from `scripts/cross_tokenizer_distill.py` and the
authors' run scripts: `losses=[sft,alm_unconstrained] alm_mode=merge_by_space_prob+append_space
tokenizer_pair_bias_threshold=0.1`, `alm_diff_fn=binary_ce`, `binarization_temp=100`).

Chunks are SRA's spans (`data/spans.py`): the shortest pieces of response text that both tokenizations end at,
which is tokenkit's "unconstrained" alignment. Per side (teacher T, student S), sample b and chunk k with tokens
t in k and last token e_k:

    log p(c_k)   = sum_{t in k} log p(x_t | x_<t)                          (read from the logits at t - 1)
    log q(c_k)   = log sum_{v in W} p(v | x_<=e_k)                        (the next token starts a new word)

W = the tokens whose text starts with a space, tab or newline, and the special tokens (tokenkit's space mask
"space+tab+newline+special"). Chunks are then merged left to right into groups g: a group ends at the first chunk
whose teacher boundary probability q_T exceeds theta (the sample's last group ends at its last chunk); a group's
likelihood is the sum of its chunks' and its boundary term the one after its last chunk. Debiased ("append_space"):

    l_T(g) = sum_{k in g} log p_T(c_k) + log q_T(c_last(g)),   l_S(g) likewise with the student's own W

Each likelihood is binarised, Bernoulli(p^(1/tau)), and the two compared by binary cross-entropy, eps = 1e-6:

    a = l_T(g) / tau - eps,   s = l_S(g) / tau - eps
    ALM(g) = -( e^a s + (1 - e^a) log(1 - e^s) )
    distill = (1 / G) sum_g ALM(g),   G = the groups of the whole batch (tokenkit's chunk_count normalisation)

Defaults as tokenkit's: tau = 100, theta = 0.1, debiasing on. The value includes the teacher's binary entropy (a
cross-entropy, not a KL), so it is not 0 where the student matches the teacher; the gradient is the binary KL's.
tokenkit trains this next to the CE with GradMag loss balancing: `balance=gradmag` (`train/weighting.py`; the
engine's default is the fixed `alpha * CE + (1 - alpha) * distill`, at which the ALM term's gradient is negligible
beside the CE's). Deviation: tokenkit reads W from its byte-level ("byteified") token strings; here from
the bytes each token stands for (`vocab.token_bytes`), the same set for byte-level BPE and SentencePiece alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sra_distill.data.batch import ModelView, PairedBatch
from sra_distill.data.vocab import token_bytes
from sra_distill.errors import ModelSourceError
from sra_distill.fields import setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs

EPSILON = 1e-6  # tokenkit's: keeps a scaled log-likelihood below 0, where log(1 - e^s) is finite
_TINY = torch.finfo(torch.float32).tiny  # floor of q, so that log q stays finite where every word start underflows
WORD_BOUNDARY_BYTES = b" \t\n"  # a token starting with one of these starts a new word (with the special tokens)


@dataclass
class ALMConfig(MethodConfig):
    """binarization_temperature: tau; a chunk of likelihood p becomes the Bernoulli p^(1/tau) (tokenkit: 100).
    debias: add to each chunk the log-probability that the next token starts a new word (tokenkit's append_space:
    on).
    merge_threshold: join consecutive chunks until the teacher's probability of a new word after one exceeds this
    (tokenkit's merge_by_space_prob, threshold 0.1); 0 = no merging.
    """

    method_names: ClassVar[tuple[str, ...]] = ("alm",)

    binarization_temperature: float = setting(100.0, gt=0)
    debias: bool = True
    merge_threshold: float = setting(0.1, ge=0, lt=1)

    def build(self, context: MethodContext) -> ALMLoss:
        return ALMLoss(
            self,
            word_start_mask(context.student_tokenizer, context.student_vocab_rows),
            word_start_mask(context.teacher_tokenizer, context.teacher_vocab_rows),
        )


def word_start_mask(tokenizer, rows: int) -> torch.Tensor:
    """[rows] bool: the ids (below `rows`) whose text starts with a space, tab or newline, or that are special."""
    mask = torch.zeros(rows, dtype=torch.bool)
    starts = [i for i, (text, _) in token_bytes(tokenizer).items() if text[:1] and text[0] in WORD_BOUNDARY_BYTES]
    starts += list(tokenizer.all_special_ids)
    ids = torch.tensor(sorted(set(starts)), dtype=torch.long)
    mask[ids[ids < rows]] = True
    return mask


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, by whichever of the two forms is accurate there (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binary_cross_entropy(teacher_log_p: torch.Tensor, student_log_p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Elementwise cross-entropy between Bernoulli(p_T^(1/tau)) and Bernoulli(p_S^(1/tau)), from log-likelihoods."""
    a = teacher_log_p.float() / temperature - EPSILON
    s = student_log_p.float() / temperature - EPSILON
    return -(torch.exp(a) * s - torch.expm1(a) * log1mexp(s))


@dataclass
class ChunkLikelihoods:
    """One side's chunks, [B, K] each: log p(c_k) (sum over the chunk's tokens), log q(c_k) (a new word after its
    last token) and whether the chunk has tokens on this side that can be scored (none at position 0)."""

    log_p: torch.Tensor
    log_q: torch.Tensor
    present: torch.Tensor


def chunk_likelihoods(
    logits: torch.Tensor, input_ids: torch.Tensor, span_ids: torch.Tensor, num_chunks: int, word_start: torch.Tensor
) -> ChunkLikelihoods:
    """Chunk log-likelihoods of one side: logits [B, T, V] (row t predicts token t + 1), input_ids and span_ids
    [B, T] (-1 outside chunks; ids >= num_chunks are ignored), word_start [V] bool (`word_start_mask`)."""
    batch, seq_len, vocab = logits.shape
    if word_start.shape != (vocab,):
        raise ValueError(f"the word-start mask has {word_start.shape[0]} entries, the logits {vocab} columns")
    device = logits.device
    slots = batch * num_chunks
    sample, position = ((span_ids >= 0) & (span_ids < num_chunks)).nonzero(as_tuple=True)
    slot = sample * num_chunks + span_ids[sample, position]
    # Token t is scored by row t - 1; token 0 has no such row, so a chunk holding it is left out (`present`).
    scored = position > 0
    # q reads the row of the chunk's last token: the distribution of the token after the chunk.
    last = torch.full((slots,), -1, dtype=torch.long, device=device).scatter_reduce(0, slot, position, "amax")
    with_tokens = (last >= 0).nonzero().squeeze(1)
    # Only the rows read below are normalised (a third to a half of a row is prompt): a row index table.
    needed = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    needed[sample[scored], position[scored] - 1] = True
    needed[with_tokens // num_chunks, last[with_tokens]] = True
    rows = needed.nonzero(as_tuple=True)
    row_of = torch.full((batch, seq_len), -1, dtype=torch.long, device=device)
    row_of[rows] = torch.arange(len(rows[0]), device=device)
    row_logits = logits[rows].float()  # [N, V]
    log_norm = torch.logsumexp(row_logits, dim=-1)
    # q as a sum of probabilities (tokenkit's form): ~3x faster than a log-sum-exp over the masked logits.
    probs = torch.exp(row_logits - log_norm[:, None])
    row_log_q = torch.log((probs @ word_start.to(probs)).clamp_min(_TINY)).clamp_max(0.0)

    token_row = row_of[sample, (position - 1).clamp_min(0)].clamp_min(0)  # unscored tokens read a dummy row
    token_log_p = row_logits[token_row, input_ids[sample, position]] - log_norm[token_row]
    token_log_p = torch.where(scored, token_log_p.clamp_max(0.0), 0.0)  # <= 0: rounding must not cross it
    log_p = torch.zeros(slots, device=device).index_add(0, slot, token_log_p)
    tokens = torch.zeros(slots, device=device).index_add(0, slot, scored.float())
    unscored = torch.zeros(slots, device=device).index_add(0, slot, (~scored).float())
    end_log_q = row_log_q[row_of[with_tokens // num_chunks, last[with_tokens]]]
    log_q = torch.zeros(slots, device=device).index_copy(0, with_tokens, end_log_q)
    present = (tokens > 0) & (unscored == 0)
    shape = (batch, num_chunks)
    return ChunkLikelihoods(log_p.reshape(shape), log_q.reshape(shape), present.reshape(shape))


def chunk_groups(
    teacher_log_q: torch.Tensor, present: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(group [B, K], closes [B, K]): the group of each chunk when chunks are merged left to right until one is
    followed by a new word with teacher probability above `threshold` (0: every chunk is its own group), and which
    chunks close their group (always the sample's last present chunk). Only `present` chunks take part."""
    closes = present & (teacher_log_q.exp() > threshold) if threshold > 0 else present
    last_present = present & (present.flip(-1).cumsum(-1).flip(-1) == 1)
    closes = closes | last_present
    group = closes.long().cumsum(-1) - closes.long()  # groups closed before the chunk
    return group, closes


def alm_loss(
    student: ChunkLikelihoods,
    teacher: ChunkLikelihoods,
    num_spans: torch.Tensor,
    temperature: float = 100.0,
    merge_threshold: float = 0.1,
    debias: bool = True,
) -> tuple[torch.Tensor, int]:
    """(distill, G): the mean binary cross-entropy over the batch's G chunk groups (see the module docstring).
    A chunk counts when both sides score it and its id is below the sample's span count num_spans [B]."""
    batch, num_chunks = student.log_p.shape
    in_sample = torch.arange(num_chunks, device=num_spans.device) < num_spans[:, None]
    present = student.present & teacher.present & in_sample.to(student.present.device)
    group, closes = chunk_groups(teacher.log_q, present, merge_threshold)
    slot = (torch.arange(batch, device=group.device)[:, None] * num_chunks + group)[present]

    def grouped(side: ChunkLikelihoods) -> torch.Tensor:
        # Debiased: the new-word term of the group's last chunk, the one after the group.
        chunk = (side.log_p + torch.where(closes, side.log_q, 0.0)) if debias else side.log_p
        return torch.zeros(batch * num_chunks, device=chunk.device).index_add(0, slot, chunk[present])

    student_groups, teacher_groups = grouped(student), grouped(teacher)
    exists = torch.zeros(batch * num_chunks, dtype=torch.bool, device=group.device).index_fill(0, slot, True)
    values = binary_cross_entropy(teacher_groups[exists], student_groups[exists], temperature)
    groups = int(exists.sum())
    return values.sum() / max(groups, 1), groups


class ALMLoss(DistillMethod):
    """Approximate likelihood matching over SRA's spans (see the module docstring)."""

    def __init__(self, config: ALMConfig, student_word_start: torch.Tensor, teacher_word_start: torch.Tensor):
        super().__init__()
        for side, mask in (("student", student_word_start), ("teacher", teacher_word_start)):
            if not bool(mask.any()):  # log q would be -inf for every chunk
                raise ModelSourceError(f"ALM: the {side} tokenizer has no token that starts a new word and no "
                                       f"special token")
        self.config = config
        self.register_buffer("student_word_start", student_word_start, persistent=False)
        self.register_buffer("teacher_word_start", teacher_word_start, persistent=False)

    def needs(self) -> Needs:
        # A batch's loss is a mean over its chunks, a few tokens each: tokens weigh micro-batches closer than samples.
        return Needs(teacher_logits=True, normalize_by="tokens")

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        num_chunks = int(batch.num_spans.max()) if batch.batch_size else 0
        student_chunks = chunk_likelihoods(student.logits, batch.student.input_ids, batch.student.span_ids,
                                           num_chunks, self.student_word_start)
        with torch.no_grad():
            teacher_chunks = chunk_likelihoods(teacher.logits, batch.teacher.input_ids, batch.teacher.span_ids,
                                               num_chunks, self.teacher_word_start)
        config = self.config
        value, groups = alm_loss(student_chunks, teacher_chunks, batch.num_spans, config.binarization_temperature,
                                 config.merge_threshold, config.debias)
        return {"distill": value, "alm": value.detach(), "alm_chunks": value.new_tensor(float(groups))}

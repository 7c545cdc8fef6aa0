"""MinED: minimum-edit-distance token and vocabulary alignment, then KL (FuseLLM lineage: Wan et al., "Knowledge
Fusion of Large Language Models", arXiv 2401.10491; as the cross-tokenizer baseline of DSKD, arXiv 2406.17328).

1. Sequence alignment (data pipeline, `collate_extras`): the response tokens of both sides (word-start markers
   removed) are aligned by dynamic time warping with cost = Levenshtein distance between token strings. A student
   token aligned to exactly one teacher token is a one-to-one pair; others are unaligned.
2. Vocabulary map (`mined_map.build_mined_map`): teacher id -> the student id at minimum edit distance. For each
   student id v hit by the map, the first (lowest) teacher id u with map(u) = v carries its logit over:
   z~_v = z^T_u; student ids not hit get -1e5.
3. At a one-to-one pair (t, j) with map(teacher token j) = student token t, the teacher target at t is z~ from the
   teacher logits predicting j; elsewhere it is the one-hot of the student's gold token (logit 100, rest -1e5).
4. distill = (1 / N_S) sum_t KL(softmax(z~_t / tau) || softmax(z^S_t / tau)) over the N_S student response tokens.

All of 2-4 follows DSKD's `MinEditDisForwardKLD` (songmzhang/DSKD, `criterions/min_edit_dis_kld.py`, `dtw`,
one-hot fallback, KD temperature 2.0 of its scripts). One deviation: DSKD aligns the *input* tokens at the
positions that predict the response; here the response tokens themselves are aligned (the tokens being predicted,
which is what the map check in 3 compares), and their predicting logits are read one position earlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sra_distill.data.batch import ModelView, PairedBatch, PairedExample, next_token_targets
from sra_distill.data.tokenization import tokenizer_spec
from sra_distill.fields import setting
from sra_distill.losses.base import DistillMethod, MethodConfig, MethodContext, Needs
from sra_distill.losses.mined_map import build_mined_map

ALIGN_KEY = "mined_teacher_pos"  # [B, T_S] teacher position aligned one-to-one with each student position, or -1
_NEG = -1e5  # DSKD's "impossible" logit
_ONE_HOT = 100.0  # DSKD's gold-token logit for unaligned positions


@dataclass
class MinEDConfig(MethodConfig):
    """temperature: KD temperature tau on both sides (DSKD's MinED scripts: 2.0)."""

    method_names: ClassVar[tuple[str, ...]] = ("mined",)

    temperature: float = setting(2.0, gt=0)

    def build(self, context: MethodContext) -> MinEDLoss:
        return MinEDLoss(self, context.student_tokenizer, context.teacher_tokenizer)


def dtw_student_to_teacher(cost: np.ndarray) -> list[list[int]]:
    """DTW over a [n_teacher, n_student] cost matrix; for each student index, the teacher indices on the path.

    Same recursion and back-trace tie order (diagonal, then teacher step, then student step) as DSKD's `dtw`.
    """
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    # Fill by anti-diagonals: cells with i + j = k depend only on diagonals k - 1 and k - 2.
    for k in range(2, n + m + 1):
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        acc[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
    acc = acc[1:, 1:]
    i, j = n - 1, m - 1
    to_teacher: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        to_teacher[j].append(i)
        options = (
            acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf,
            acc[i - 1, j] if i > 0 else np.inf,
            acc[i, j - 1] if j > 0 else np.inf,
        )
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    to_teacher[0].append(0)
    return to_teacher


def align_example(example: PairedExample, student_tokenizer, teacher_tokenizer) -> list[int]:
    """Per student position, the teacher position aligned one-to-one with it (response tokens only), else -1."""
    from rapidfuzz import process  # local: only MinED needs rapidfuzz (importing the methods must not)
    from rapidfuzz.distance import Levenshtein

    s_pos = [t for t, is_label in enumerate(example.student.is_target) if is_label and t > 0]
    t_pos = [t for t, is_label in enumerate(example.teacher.is_target) if is_label and t > 0]
    aligned = [-1] * len(example.student.input_ids)
    if not s_pos or not t_pos:
        return aligned
    s_marker = tokenizer_spec(student_tokenizer).word_start_marker
    t_marker = tokenizer_spec(teacher_tokenizer).word_start_marker
    s_tokens = [tok.replace(s_marker, "") for tok in student_tokenizer.convert_ids_to_tokens(
        [example.student.input_ids[t] for t in s_pos])]
    t_tokens = [tok.replace(t_marker, "") for tok in teacher_tokenizer.convert_ids_to_tokens(
        [example.teacher.input_ids[t] for t in t_pos])]
    cost = process.cdist(t_tokens, s_tokens, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)
    for k, teacher_indices in enumerate(dtw_student_to_teacher(cost)):
        if len(teacher_indices) == 1:
            aligned[s_pos[k]] = t_pos[teacher_indices[0]]
    return aligned


def fit_width(tensor: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """Cut or right-pad the last dimension to `width`."""
    if tensor.shape[-1] >= width:
        return tensor[..., :width]
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]), value=fill)


class MinEDLoss(DistillMethod):
    """MinED alignment + forward KL (see the module docstring)."""

    def __init__(self, config: MinEDConfig, student_tokenizer, teacher_tokenizer):
        super().__init__()
        self.config = config
        teacher_to_student = build_mined_map(student_tokenizer, teacher_tokenizer)
        # For each student id, the lowest teacher id mapped onto it (-1: none); DSKD keeps one teacher id per
        # student id (max_align_num = 1), the first in teacher-id order.
        first_teacher = torch.full((len(student_tokenizer),), len(teacher_to_student), dtype=torch.long)
        valid = teacher_to_student.ge(0).nonzero().squeeze(-1)
        first_teacher.scatter_reduce_(0, teacher_to_student[valid], valid, reduce="amin")
        first_teacher[first_teacher.eq(len(teacher_to_student))] = -1
        self.register_buffer("teacher_to_student", teacher_to_student, persistent=False)
        self.register_buffer("student_to_teacher", first_teacher, persistent=False)

    @staticmethod
    def collate_extras(examples: list[PairedExample], student_tokenizer, teacher_tokenizer) -> dict[str, torch.Tensor]:
        width = max(len(e.student.input_ids) for e in examples)
        rows = [align_example(e, student_tokenizer, teacher_tokenizer) for e in examples]
        return {ALIGN_KEY: torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)}

    def needs(self) -> Needs:
        return Needs(teacher_logits=True)

    def aligned_teacher_logits(
        self, batch: PairedBatch, student: ModelView, teacher: ModelView
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher target logits in the student's vocabulary for the rows predicting student positions 1..T-1
        ([B, T-1, V_S]), and which rows were carried over from the teacher rather than one-hot ([B, T-1])."""
        if ALIGN_KEY not in batch.extras:
            raise ValueError(
                f"MinED needs batch.extras[{ALIGN_KEY!r}]; build batches with MinEDLoss.collate_extras in the collator"
            )
        labelled, gold_ids = next_token_targets(batch.student.labels)
        s_ids = batch.student.input_ids
        width_s = student.logits.shape[-1]
        t_pos = fit_width(batch.extras[ALIGN_KEY].to(s_ids.device), s_ids.shape[1], -1)[:, 1:]  # targets 1..T-1
        targets = s_ids[:, 1:]
        b_idx = torch.arange(s_ids.shape[0], device=s_ids.device)[:, None].expand_as(t_pos)
        safe_pos = t_pos.clamp(min=1)
        teacher_token = batch.teacher.input_ids[b_idx, safe_pos]
        mapped = self.teacher_to_student.to(s_ids.device)
        mapped = fit_width(mapped, max(teacher.logits.shape[-1], int(teacher_token.max()) + 1), -1)[teacher_token]
        aligned = t_pos.ge(1) & mapped.eq(targets) & labelled

        # Teacher logits predicting the aligned teacher token, carried onto student ids through the map.
        rows = teacher.logits[b_idx, safe_pos - 1].float()  # [B, T-1, V_T]
        first_teacher = fit_width(self.student_to_teacher.to(s_ids.device), width_s, -1)
        first_teacher = first_teacher.masked_fill(first_teacher.ge(rows.shape[-1]), -1)
        carried = rows[..., first_teacher.clamp(min=0)].masked_fill(first_teacher.lt(0), _NEG)

        gold = torch.where(labelled, gold_ids, torch.zeros_like(targets))
        one_hot = torch.full_like(carried, _NEG).scatter_(-1, gold.unsqueeze(-1), _ONE_HOT)
        return torch.where(aligned.unsqueeze(-1), carried, one_hot), aligned

    def forward(self, batch: PairedBatch, student: ModelView, teacher: ModelView) -> dict[str, torch.Tensor]:
        teacher_logits, aligned = self.aligned_teacher_logits(batch, student, teacher)
        mask, _ = next_token_targets(batch.student.labels)
        tau = self.config.temperature
        s_logp = torch.log_softmax(student.logits[:, :-1].float() / tau, -1)
        t_logp = torch.log_softmax(teacher_logits / tau, -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        count = mask.sum().clamp(min=1)
        value = (kl * mask).sum() / count
        return {
            "distill": value,
            "mined_kl": value.detach(),
            "mined_aligned_fraction": ((aligned & mask).sum() / count).float(),
        }

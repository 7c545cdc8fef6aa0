"""The contract every distillation method follows.

A method is a small `torch.nn.Module` (it owns its trainable parts, e.g. projectors) with:

* `needs() -> Needs`: what the engine must capture from each model in its single forward pass;
* `forward(batch, student, teacher) -> dict[str, Tensor]`: scalar tensors, always including `"distill"` (the
  distillation term, already combining the method's own components) and every component under its own name.
  It may also return `"ce"`, the student's next-token CE (`logit_losses.causal_lm_ce` of its logits), when it
  computes it in one pass with a term of its own on the same logits (SRA's span KL: `logit_losses.ce_and_span_kl`);
  otherwise the engine computes the CE.

The engine combines `loss = alpha * ce + (1 - alpha) * distill`. A method never loads or calls a model.
A method reads the teacher's states only from the row that predicts the first response token onwards (spans lie in
the response; logit-based methods mask rows by their response targets): a teacher cache stores only those rows and
gives zeros before them (`train/teacher_cache.py`).

Each method file holds the method's config dataclass beside its module. The config derives from `MethodConfig`,
the typed contract the engine reads as plain attributes:

* `method_names`: the method names it serves (one for most; the same-tokenizer divergences share one section);
* `uses_teacher`: False for a method that never runs the teacher (SFT): the engine then loads no teacher and
  tokenises the student's side only (`PairedBatch.teacher` is None, and so are the context's teacher facts);
* `projector_lr`: the learning rate of the method's own trainable parts (projectors), a setting (field) of the
  configs whose methods have some, None otherwise;
* `build(context: MethodContext) -> XLoss`: one explicit constructor call passing only what the method uses
  (widths, layer counts, tokenizers, ... from the `MethodContext`).

Its settings are fields declared with `fields.setting` (ranges, names, resume safety), checked when it is built.
Plugging a method in is one line: a field `x: XConfig = field(default_factory=XConfig)` of `config.MethodSettings`
(the section `methods.x` of the settings).

Per-token data that depends only on token ids (e.g. MinED's sequence alignment) is computed in the data pipeline,
not in the loss: a method may define the static hook

    collate_extras(examples: list[PairedExample], student_tokenizer, teacher_tokenizer) -> dict[str, Tensor]

which the collator calls in its workers on the examples of a batch; the result goes into `PairedBatch.extras`.
Tensors indexed by student positions are [B, T'] with T' = the longest student `input_ids` among the examples;
the loss pads or cuts them to the batch's T, so the collator may pad further.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sra_distill.fields import Settings


@dataclass(frozen=True)
class MethodContext:
    """The facts about the two models that methods are sized by (`methods.method_context` reads them)."""

    method: str  # the method name asked for (the same-tokenizer divergences share one config section)
    student_dim: int  # hidden sizes
    teacher_dim: int | None  # (the teacher's facts are None when the method loads no teacher)
    student_num_layers: int  # decoder blocks
    teacher_num_layers: int | None
    student_tokenizer: Any
    teacher_tokenizer: Any
    student_vocab_rows: int  # rows of each LM head (a padded embedding may exceed the tokenizer's size)
    teacher_vocab_rows: int | None


@dataclass(frozen=True)
class Needs:
    """What a method needs captured. Layer indices follow `ModelView.hidden` (num_layers = final-norm output);
    -1 means the last (final-norm) layer."""

    student_hidden_layers: tuple[int, ...] = ()
    teacher_hidden_layers: tuple[int, ...] = ()
    student_attention_layers: tuple[int, ...] = ()  # last non-pad token's attention row, summed over heads
    teacher_attention_layers: tuple[int, ...] = ()
    teacher_logits: bool = False  # (the student's token logits are always captured: the CE needs them)
    # What `distill` is a mean over, so the engine can weight micro-batches into one global mean across processes
    # and accumulation steps: "samples" (divided by the batch size, as SRA) or "tokens" (response tokens).
    normalize_by: str = "samples"


class MethodConfig(Settings, abc.ABC):
    """Base of every method's config dataclass: what the engine needs to know about a method (module docstring)."""

    method_names: ClassVar[tuple[str, ...]]  # the method names this config serves (`method=`)
    uses_teacher: ClassVar[bool] = True  # False: the method never runs the teacher, none is loaded
    # Learning rate of the method's own trainable parameters. A method with some declares it as a setting, a field
    # `projector_lr: float = setting(..., gt=0)` that replaces this None.
    projector_lr: float | None = None

    @abc.abstractmethod
    def build(self, context: MethodContext) -> DistillMethod:
        """The method's loss module, sized for the two models of `context`."""


class DistillMethod(torch.nn.Module):
    """Base of every method module: trainable parts as submodules, `needs()` and `forward()` as above.

    `collate_extras(examples, student_tokenizer, teacher_tokenizer)` runs in data-loader workers on
    `PairedExample`s and returns per-batch tensors that land in `PairedBatch.extras` (e.g. MinED's token
    alignment); most methods need none.
    """

    def __init__(self, config: MethodConfig | None = None):
        super().__init__()
        self.config = config

    def needs(self) -> Needs:
        raise NotImplementedError

    @staticmethod
    def collate_extras(examples: list, student_tokenizer, teacher_tokenizer) -> dict[str, torch.Tensor]:
        return {}

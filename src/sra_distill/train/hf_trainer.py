"""SRA (or any cross-tokenizer method here) inside your own Hugging Face `Trainer` code.

`DistillTrainer` is a drop-in `transformers.Trainer` (alias `SRATrainer`, method `sra` by default):

* `DistillCollator` turns raw records (dicts in any format `data/records.py` reads: `prompt`/`output`, Alpaca, chat
  `messages`; or `Record`s) into the paired batch: both tokenizations, labels and the shared span ids, as a
  flat dict of tensors so the Trainer moves it to the device like any batch (`batch_to_features` /
  `features_to_batch` convert between that dict and `PairedBatch`).
* `compute_loss` runs the frozen teacher once (no grad; or reads its states from a `sra teacher-cache` folder,
  `teacher_cache=`, when the teacher is not given) and the student once, and returns
  `alpha * CE + (1 - alpha) * distill` (`weighting.unit_weights`; alpha fixed, or per batch with
  `balance="gradmag"`), the engine's loss for a single micro-batch
  (`loss`, `ce`, `distill` and the method's components are logged).
* The trainer owns the method module (SRA's projector): it is built from the two models like the engine builds it,
  moved to the device, added to the optimizer as its own parameter group (`projector_lr`), clipped together with
  the student's gradients, averaged across processes, written by `save_model` (so into every checkpoint) as
  `distill_method.safetensors`, and restored by `train(resume_from_checkpoint=...)`; the optimizer state of the
  projector comes back with the Trainer's own optimizer checkpoint.

The Trainer's `remove_unused_columns` is turned off: the collator needs the raw text columns.

Differences from `sra distill`: with gradient accumulation or several processes the Trainer averages per-micro-batch
losses (the engine weights micro-batches by their tokens / samples into one global mean); the learning-rate schedule
and optimizer are the Trainer's (`TrainingArguments`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from sra_distill.config import Config, method_sections, method_settings
from sra_distill.data.batch import PairedBatch, PairedExample, SideBatch
from sra_distill.data.collate import PairedCollator
from sra_distill.data.pairing import check_lengths, pair_example
from sra_distill.data.records import Record, parse_record
from sra_distill.errors import ConfigError, NotFoundError
from sra_distill.evaluation.model_card import generation_config_for
from sra_distill.losses.logit_losses import causal_lm_ce
from sra_distill.models.capture import capture, last_block_parameters
from sra_distill.train.methods import build_method, projector_groups
from sra_distill.train.teacher_cache import TeacherCache
from sra_distill.train.weighting import gradmag_alpha, unit_weights

METHOD_WEIGHTS_NAME = "distill_method.safetensors"
_SIDE_FIELDS = ("input_ids", "attention_mask", "labels", "span_ids", "response_start")


def batch_to_features(batch: PairedBatch) -> dict[str, torch.Tensor]:
    """A `PairedBatch` as one flat dict of tensors (`student_input_ids`, ..., `num_spans`, `extra_<name>`)."""
    features: dict[str, torch.Tensor] = {}
    for side in ("student", "teacher"):
        side_batch: SideBatch = getattr(batch, side)
        for name in _SIDE_FIELDS:
            features[f"{side}_{name}"] = getattr(side_batch, name)
    features["num_spans"] = batch.num_spans
    for name, value in batch.extras.items():
        features[f"extra_{name}"] = value
    return features


def features_to_batch(features: dict[str, torch.Tensor]) -> PairedBatch:
    """The inverse of `batch_to_features`."""
    missing = [f"{side}_{name}" for side in ("student", "teacher") for name in _SIDE_FIELDS
               if f"{side}_{name}" not in features] + ([] if "num_spans" in features else ["num_spans"])
    if missing:
        raise KeyError(f"not a paired batch (from DistillCollator): missing {', '.join(missing)}")

    def side(prefix: str) -> SideBatch:
        return SideBatch(*(features[f"{prefix}_{name}"] for name in _SIDE_FIELDS))

    extras = {k[6:]: v for k, v in features.items() if k.startswith("extra_")}
    return PairedBatch(side("student"), side("teacher"), features["num_spans"], extras)


class DistillCollator:
    """`data_collator` for the Trainer: records -> the paired batch as a flat dict of tensors.

    Each feature is a dict in a format `data.records.parse_record` reads, a `Record`, or an already paired `PairedExample`.
    Pairing follows the engine: the prompt keeps its last `max_prompt_length` tokens, then the response is cut so
    prompt + response + EOS fit `max_length` tokens per side. `extras_fn`: a method's `collate_extras` (MinED's
    alignment), bound to the two tokenizers.
    """

    def __init__(self, student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 256, max_prompt_length: int = 128, extras_fn=None):
        check_lengths(max_length, max_prompt_length)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.paired = PairedCollator.for_tokenizers(student_tokenizer, teacher_tokenizer, extras_fn)

    def pair(self, feature: Any, index: int) -> PairedExample:
        if isinstance(feature, PairedExample):
            return feature
        record = feature if isinstance(feature, Record) else parse_record(feature, "dataset", index + 1)
        return pair_example(record, self.student_tokenizer, self.teacher_tokenizer, self.max_length,
                            self.max_prompt_length)

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        return batch_to_features(self.paired([self.pair(f, i) for i, f in enumerate(features)]))


class DistillTrainer(Trainer):
    """`transformers.Trainer` that distils `teacher` into `model` (the student) with a cross-tokenizer method.

    model, processing_class: the student and its tokenizer; teacher, teacher_tokenizer: the frozen teacher.
    teacher_cache: instead of `teacher`, a `sra teacher-cache` folder built over the records this trainer reads, with
    these tokenizers and lengths: the teacher's states are read there (exact for an fp32 cache) and only its head
    loads; a record the cache lacks is refused when its batch comes.
    method: `sra` (default), `uld`, `mined`, `dskd`, `multilevel_ot`, `alm` or a same-tokenizer divergence (a teacher
    is required: for `sft` use a plain `transformers.Trainer`);
    method_config: that method's config dataclass (e.g. `SRAConfig(geo_weight=10)`), default the paper's values.
    alpha: the CE share of the loss; balance: "alpha" (that fixed share) or "gradmag" (per batch, from both terms'
    gradient norms on the student's last block, `weighting.gradmag_alpha`; logged as `alpha`).
    projector_lr, normalize_vocab: override the method config's fields of those names when given (the method's own
    parameters' learning rate; SRA's shared-vocabulary rule).
    max_length, max_prompt_length: pairing lengths per side when the default `DistillCollator` is used.
    Every other argument is the Trainer's.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        teacher: PreTrainedModel | None = None,
        args: TrainingArguments | None = None,
        *,
        processing_class: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase,
        method: str = "sra",
        method_config: Any = None,
        alpha: float = 0.5,
        balance: str = "alpha",
        projector_lr: float | None = None,
        normalize_vocab: bool | None = None,
        max_length: int = 256,
        max_prompt_length: int = 128,
        data_collator=None,
        teacher_cache: str | os.PathLike | None = None,
        **kwargs,
    ):
        if (teacher is None) == (teacher_cache is None):
            raise ConfigError("DistillTrainer: give the teacher model or a teacher_cache folder (`sra teacher-cache`), "
                              "one of the two")
        settings = Config(method=method, alpha=alpha, balance=balance)  # refuses unknown names, alpha outside [0, 1]
        method_config = method_config if method_config is not None else method_settings(settings)
        if not method_config.uses_teacher:
            raise ConfigError(f"method {method!r} reads no teacher: train with a plain transformers.Trainer")
        # A method without projectors (or a shared vocabulary) has no such field: the argument does not apply to it.
        declared = {f.name for f in dataclasses.fields(method_config)}
        overrides = {name: value for name, value in (("projector_lr", projector_lr),
                                                     ("normalize_vocab", normalize_vocab))
                     if value is not None and name in declared}
        settings.methods = dataclasses.replace(
            settings.methods, **{method_sections()[method]: dataclasses.replace(method_config, **overrides)})
        self.alpha, self.balance = alpha, balance
        # With a cache the teacher's states are read from it and only its head (and embeddings) load.
        self.teacher_cache = None if teacher_cache is None else TeacherCache.open_for_pairs(
            teacher_cache, processing_class, teacher_tokenizer, max_length, max_prompt_length)
        self.teacher = (self.teacher_cache.head if teacher is None else teacher).eval().requires_grad_(False)
        self.teacher_tokenizer = teacher_tokenizer
        self.distill_method, self.method_lr = build_method(settings, model, self.teacher, processing_class,
                                                           teacher_tokenizer)
        self.needs = self.distill_method.needs()
        if self.teacher_cache is not None:
            self.teacher_cache.check_needs(method, self.needs)
        if data_collator is None:
            extras_fn = functools.partial(type(self.distill_method).collate_extras,
                                          student_tokenizer=processing_class, teacher_tokenizer=teacher_tokenizer)
            data_collator = DistillCollator(processing_class, teacher_tokenizer, max_length, max_prompt_length,
                                            extras_fn)
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        args.remove_unused_columns = False  # the collator reads the raw record columns
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)
        self.teacher.to(self.args.device)
        self.distill_method.to(self.args.device)
        self._component_sums: dict[str, float] = {}
        self._component_count = 0

    # ---------------------------------------------------------------------------------------------- optimisation
    def method_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.distill_method.parameters() if p.requires_grad]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # super() hands back the optimizer it made earlier when called again: add the group once.
        if not any(id(p) in known for p in self.method_parameters()):
            for group in projector_groups(self.distill_method, self.method_lr, self.args.weight_decay):
                optimizer.add_param_group(group)
        return optimizer

    def _clip_grad_norm(self, model):
        # The engine clips the student's and the projector's gradients together; so does this.
        params = [*model.parameters(), *self.method_parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            # The projector is not inside the Trainer's DDP wrapper: average its gradients like DDP averages the
            # student's (an all-reduce per micro-batch sums to the same as one per step).
            for param in self.method_parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG)
        return loss

    # ------------------------------------------------------------------------------------------------------ loss
    def distill_losses(self, model, batch: PairedBatch) -> dict[str, torch.Tensor]:
        """`loss` and its parts for one paired batch: the teacher once (no grad), the student once."""
        needs = self.needs
        with torch.no_grad():
            teacher_view = self.teacher_cache.view(batch.teacher, needs) if self.teacher_cache else capture(
                self.teacher, batch.teacher.input_ids, batch.teacher.attention_mask,
                hidden_layers=needs.teacher_hidden_layers, attention_layers=needs.teacher_attention_layers,
                logits=needs.teacher_logits,
            )
        student_view = capture(
            model, batch.student.input_ids, batch.student.attention_mask,
            hidden_layers=needs.student_hidden_layers, attention_layers=needs.student_attention_layers, logits=True,
        )
        out = self.distill_method(batch, student_view, teacher_view)
        if "ce" not in out:  # a method may compute it with its own logit term in one pass (losses/base.py)
            out["ce"] = causal_lm_ce(student_view.logits, batch.student.labels)
        alpha = self.alpha
        if self.balance == "gradmag":  # outside training (no gradient) the fixed alpha
            balanced = gradmag_alpha(out["ce"], out["distill"],
                                     last_block_parameters(self.accelerator.unwrap_model(model)))
            alpha = alpha if balanced is None else balanced
            out["alpha"] = torch.tensor(alpha)
        # The Trainer averages over micro-batches and processes itself, so the weights only mix the two terms.
        out["loss"] = unit_weights(alpha, distills=True).loss(out["ce"], out["distill"])
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.distill_losses(model, features_to_batch(inputs))
        if model.training:
            for name, value in out.items():
                if name != "loss":
                    self._component_sums[name] = self._component_sums.get(name, 0.0) + float(value.detach())
            self._component_count += 1
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.distill_losses(model, features_to_batch(inputs))["loss"]
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_count:  # a training log: add the mean of each part since the last
            logs.update({k: v / self._component_count for k, v in self._component_sums.items()})
            self._component_sums, self._component_count = {}, 0
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------- save and restore
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student (and tokenizer) as the Trainer saves it, plus the method's weights and a generation config
        that stops at the student tokenizer's EOS."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            state = {k: v.detach().contiguous().cpu() for k, v in self.distill_method.state_dict().items()}
            if state:
                save_file(state, os.path.join(output_dir, METHOD_WEIGHTS_NAME))
            model = self.accelerator.unwrap_model(self.model)
            generation_config_for(model, self.processing_class).save_pretrained(output_dir)

    def load_method_state(self, checkpoint: str) -> None:
        """Restore the method's weights saved by `save_model` in `checkpoint`."""
        path = os.path.join(checkpoint, METHOD_WEIGHTS_NAME)
        expected = self.distill_method.state_dict()
        if not expected:
            return
        if not os.path.isfile(path):
            raise NotFoundError(f"{path} not found: {checkpoint} was not written by a DistillTrainer, so the "
                                f"{type(self.distill_method).__name__} weights (projector) cannot be restored")
        state = load_file(path, device=str(next(iter(expected.values())).device))
        self.distill_method.load_state_dict(state)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise NotFoundError(f"no checkpoint found in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            self.load_method_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)


SRATrainer = DistillTrainer

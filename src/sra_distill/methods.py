"""Building the run's method: the shared facts about the two models (`MethodContext`), then the method's own config
builds its loss module (`losses/<name>.py`; the sections are the fields of `config.MethodSettings`)."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.config import method_sections, method_settings
from sra_distill.losses.base import DistillMethod, MethodContext
from sra_distill.losses.divergences import KINDS as DIVERGENCE_KINDS

METHOD_NAMES = tuple(method_sections())
CROSS_TOKENIZER_METHODS = tuple(name for name in METHOD_NAMES if name not in DIVERGENCE_KINDS)


def method_context(
    method: str,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
) -> MethodContext:
    """The widths, layer counts, tokenizers and head sizes of a student-teacher pair."""

    def width(model: PreTrainedModel) -> int:
        return int(model.get_input_embeddings().embedding_dim)

    def layers(model: PreTrainedModel) -> int:
        return int(model.config.get_text_config().num_hidden_layers)

    return MethodContext(
        method=method, student_dim=width(student), teacher_dim=width(teacher),
        student_num_layers=layers(student), teacher_num_layers=layers(teacher),
        student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
        student_vocab_rows=student.get_output_embeddings().weight.shape[0],
        teacher_vocab_rows=teacher.get_output_embeddings().weight.shape[0],
    )


def build_method(
    cfg,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
) -> tuple[DistillMethod, float | None]:
    """The loss module for `cfg.method`, sized for the two models, and the learning rate of its own parameters (its
    config's `projector_lr`; None for a method without trainable parts)."""
    if cfg.method not in METHOD_NAMES:
        raise ValueError(f"method {cfg.method!r} is not known; choose one of: {', '.join(METHOD_NAMES)}")
    settings = method_settings(cfg)
    method = settings.build(method_context(cfg.method, student, teacher, student_tokenizer, teacher_tokenizer))
    lr = getattr(settings, "projector_lr", None)
    if lr is None and any(p.requires_grad for p in method.parameters()):
        raise ValueError(f"method {cfg.method!r} has trainable parameters, but its config "
                         f"{type(settings).__name__} has no projector_lr for them")
    return method, lr

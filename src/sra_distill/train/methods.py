"""Building the run's method: the shared facts about the two models (`MethodContext`), then the method's own config
builds its loss module (`losses/<name>.py`; the sections are the fields of `config.MethodSettings`), and the optimizer
group of its own parameters."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.config import method_settings
from sra_distill.losses.base import DistillMethod, MethodContext


def method_context(
    method: str,
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
) -> MethodContext:
    """The widths, layer counts, tokenizers and head sizes of a student-teacher pair (teacher None: its facts
    are None)."""

    def width(model: PreTrainedModel | None) -> int | None:
        return None if model is None else int(model.get_input_embeddings().embedding_dim)

    def layers(model: PreTrainedModel | None) -> int | None:
        return None if model is None else int(model.config.get_text_config().num_hidden_layers)

    def head_rows(model: PreTrainedModel | None) -> int | None:
        return None if model is None else int(model.get_output_embeddings().weight.shape[0])

    return MethodContext(
        method=method, student_dim=width(student), teacher_dim=width(teacher),
        student_num_layers=layers(student), teacher_num_layers=layers(teacher),
        student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
        student_vocab_rows=head_rows(student), teacher_vocab_rows=head_rows(teacher),
    )


def build_method(
    cfg,
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[DistillMethod, float | None]:
    """The loss module for `cfg.method` (a name `Config` accepted), sized for the two models, and the learning rate
    of its own parameters (its config's `projector_lr`; None for a method without trainable parts)."""
    settings = method_settings(cfg)
    method = settings.build(method_context(cfg.method, student, teacher, student_tokenizer, teacher_tokenizer))
    if settings.projector_lr is None and any(p.requires_grad for p in method.parameters()):
        raise ValueError(f"method {cfg.method!r} has trainable parameters, but its config "
                         f"{type(settings).__name__} has no projector_lr for them")
    return method, settings.projector_lr


def projector_groups(method: DistillMethod, lr: float | None, weight_decay: float) -> list[dict]:
    """The optimizer parameter group of the method's own trainable parameters (projectors) at their learning rate;
    none for a method without any. The engine and `DistillTrainer` both build it here."""
    params = [p for p in method.parameters() if p.requires_grad]
    return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

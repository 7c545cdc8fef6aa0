"""Method name -> its config type and how to build its loss module. Each method lives in `losses/<name>.py`."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.losses.sra import SRAConfig, SRALoss
from sra_distill.vocab import shared_vocab

# Config sections under `methods:` in the YAML, one per loss module.
METHOD_CONFIGS: dict[str, type] = {"sra": SRAConfig}


def _width(model: PreTrainedModel) -> int:
    return int(model.get_input_embeddings().embedding_dim)


def _layers(model: PreTrainedModel) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def build_method(
    cfg,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
):
    """The loss module for `cfg.method`, sized for the two models."""
    dims = (_width(student), _width(teacher))
    if cfg.method == "sra":
        shared = shared_vocab(
            student_tokenizer, teacher_tokenizer, normalize=cfg.normalize_vocab,
            student_rows=student.get_output_embeddings().weight.shape[0],
            teacher_rows=teacher.get_output_embeddings().weight.shape[0],
        )
        return SRALoss(cfg.methods.sra, *dims, shared, _layers(student), _layers(teacher))
    raise ValueError(f"method {cfg.method!r} is not known; choose one of: {', '.join(sorted(METHOD_CONFIGS))}")

"""Method name -> its config section and how to build its loss module. Each method lives in `losses/<name>.py`."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.losses.base import DistillMethod
from sra_distill.losses.divergences import KINDS as DIVERGENCE_KINDS
from sra_distill.losses.divergences import DivergenceConfig, DivergenceLoss
from sra_distill.losses.dskd import DSKDConfig, DSKDLoss
from sra_distill.losses.mined import MinEDConfig, MinEDLoss
from sra_distill.losses.multilevel_ot import MultiLevelOTConfig, MultiLevelOTLoss
from sra_distill.losses.sft import SFTConfig, SFTLoss
from sra_distill.losses.sra import SRAConfig, SRALoss
from sra_distill.losses.uld import ULDConfig, ULDLoss
from sra_distill.vocab import shared_vocab

# Config sections under `methods:` in the YAML, one per loss module (the divergences share one section).
METHOD_CONFIGS: dict[str, type] = {
    "sra": SRAConfig,
    "uld": ULDConfig,
    "mined": MinEDConfig,
    "dskd": DSKDConfig,
    "multilevel_ot": MultiLevelOTConfig,
    "divergence": DivergenceConfig,
}
# Methods whose module takes the uniform constructor (config, dims, tokenizers, layer counts).
UNIFORM_METHODS = {"uld": ULDLoss, "mined": MinEDLoss, "dskd": DSKDLoss, "multilevel_ot": MultiLevelOTLoss}
CROSS_TOKENIZER_METHODS = ("sft", "sra", *UNIFORM_METHODS)
METHOD_NAMES = (*CROSS_TOKENIZER_METHODS, *DIVERGENCE_KINDS)


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
) -> tuple[DistillMethod, float]:
    """The loss module for `cfg.method`, sized for the two models, and the learning rate of its own parameters."""
    dims = (_width(student), _width(teacher))
    layers = (_layers(student), _layers(teacher))
    tokenizers = (student_tokenizer, teacher_tokenizer)
    name = cfg.method
    if name == "sft":
        return SFTLoss(SFTConfig(), *dims, *tokenizers, *layers), cfg.projector_lr
    if name == "sra":
        shared = shared_vocab(
            student_tokenizer, teacher_tokenizer, normalize=cfg.normalize_vocab,
            student_rows=student.get_output_embeddings().weight.shape[0],
            teacher_rows=teacher.get_output_embeddings().weight.shape[0],
        )
        return SRALoss(cfg.methods.sra, *dims, shared, *layers), cfg.projector_lr
    if name in UNIFORM_METHODS:
        config = getattr(cfg.methods, name)
        lr = cfg.methods.dskd.projector_lr if name == "dskd" else cfg.projector_lr
        return UNIFORM_METHODS[name](config, *dims, *tokenizers, *layers), lr
    if name in DIVERGENCE_KINDS:
        base = cfg.methods.divergence
        config = DivergenceConfig(kind=name, temperature=base.temperature, skew_lambda=base.skew_lambda,
                                  akl_mu=base.akl_mu)
        return DivergenceLoss(config, *dims, *tokenizers, *layers), cfg.projector_lr
    raise ValueError(f"method {name!r} is not known; choose one of: {', '.join(METHOD_NAMES)}")

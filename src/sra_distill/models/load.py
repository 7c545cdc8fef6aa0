"""Loading teachers and students: packaged GGUF models, local directories, GGUF files, hub ids, random inits.

Safe by default: weights load from safetensors where the source has them, no remote code unless
`trust_remote_code`, and no hub access unless `allow_download`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sra_distill.config import ArchSettings
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.errors import ConfigError, ModelSourceError, NotFoundError
from sra_distill.models.sources import check_local_model, local_path, missing_source_error, resolve_model_source
from sra_distill.models.student import student_folder

# The dtype words of every loader setting (teacher_precision, `sra evaluate --dtype`); "auto" = as saved.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's names, accepted as well
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype from a dtype word (fp32, bf16, fp16, or torch's float32, ...), or "auto"."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    word = DTYPE_ALIASES.get(dtype, dtype)
    if word not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[word]


# The config fields that ArchSettings.dropout sets, per random architecture.
DROPOUT_FIELDS = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "llama": ("attention_dropout",),
}


def random_model(arch: str, settings: ArchSettings, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM sized by `settings`, with the tokenizer's vocabulary and special ids."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    inter = settings.intermediate_size or 4 * settings.hidden_size
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    dropout = {} if settings.dropout is None else dict.fromkeys(DROPOUT_FIELDS.get(arch, ()), settings.dropout)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=settings.hidden_size, n_layer=settings.num_layers, n_head=settings.num_heads,
            n_inner=inter, n_positions=settings.max_positions, **special, **dropout,
        )
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers,
            num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_kv_heads or settings.num_heads,
            intermediate_size=inter, max_position_embeddings=settings.max_positions, tie_word_embeddings=True,
            **special, **dropout,
        )
        return LlamaForCausalLM(config)
    raise ConfigError(f"random:{arch}: unknown architecture; use random:gpt2 or random:llama")


def load_model(
    source: str | Path,
    *,
    tokenizer: str | None = None,
    dtype: str | torch.dtype = "auto",
    arch: ArchSettings | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    layers: int | list[int] | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a `teacher`/`student` setting or a model to evaluate; see `Config.teacher` for the
    accepted forms (a `save_pretrained` folder, a packaged name, a .gguf file, a hub id, random:<arch>, from:MODEL).

    tokenizer: a known name or folder (`tokenization.load_tokenizer`); None = the model's own, which a folder must
    then hold. dtype: a `DTYPES` word (or torch's name, or a torch.dtype); "auto" = as saved (random models:
    float32). arch, seed: the shape and initialisation of random:<arch> models. from:MODEL builds (once, cached)
    MODEL's body with `tokenizer`'s vocabulary (`sra_distill.models.student`), keeping the decoder blocks `layers`
    (None = all). device: where to put the model (None: where it loads, the CPU).
    """
    source = str(source)
    dtype = resolve_dtype(dtype)
    if source.startswith("from:"):
        if tokenizer is None:
            raise ConfigError(f"{source}: a student built from another model needs a tokenizer setting "
                              f"(student_tokenizer, or --tokenizer), the vocabulary it is built for")
        source = str(student_folder(source.split(":", 1)[1], tokenizer, layers,
                                    trust_remote_code=trust_remote_code, allow_download=allow_download))
    elif layers is not None:
        raise ConfigError(f"{source}: layers (student_layers) apply only to a student built with from:MODEL")
    if source.startswith("random:"):
        if tokenizer is None:
            raise ConfigError(f"{source}: a randomly initialised model needs a tokenizer setting")
        tok = load_tokenizer(tokenizer, trust_remote_code, not allow_download)
        model = random_model(source.split(":", 1)[1], arch or ArchSettings(), tok, seed)
        model = model if dtype == "auto" else model.to(dtype)
        return (model if device is None else model.to(device)), tok
    location = resolve_model_source(source)
    folder = local_path(location)
    check_local_model(location)  # a folder on this machine: say what is missing rather than ask the hub
    if folder is not None:
        # AutoTokenizer silently builds an empty tokenizer from config.json alone, so look for its files first.
        if tokenizer is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise NotFoundError(f"model directory {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                f"give a tokenizer name or folder (tokenizer setting, or --tokenizer)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=not allow_download
        )
        tok = load_tokenizer(tokenizer or location, trust_remote_code, not allow_download)
    except OSError as exc:  # transformers' "not found / cannot connect" (hub access is off without allow_download)
        if allow_download or folder is not None:
            raise
        raise missing_source_error(source, str(exc)) from None
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise ModelSourceError(
            f"{source}: tokenizer has {len(tok)} tokens but the model only {model.get_input_embeddings().num_embeddings}"
            " embedding rows; check the tokenizer setting"
        )
    return (model if device is None else model.to(device)), tok

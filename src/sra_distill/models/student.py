"""A pretrained student with another tokenizer: the source model's body, the new tokenizer's vocabulary.

Embedding rows of the new vocabulary come from the source model (fast vocabulary transfer, Gee et al. 2022):

* copied: the token's text exists as one source token -> that source row. Token strings are compared as the
  bytes they stand for (`vocab.token_bytes`): SentencePiece `▁` and byte-level `Ġ` are spaces, byte-fallback
  `<0xNN>` is byte NN, so Llama-2's `▁the` takes SmolLM2's `Ġthe` row.
* composed: otherwise the mean of the source rows of the source tokenizer's tokenization of the token's text
  (checked to reproduce the bytes; else a greedy longest match over the source vocabulary's byte strings, which
  also covers lone bytes of a multi-byte character).
* special tokens map by role (BOS, EOS, PAD, UNK) to the source's token of the same role.
* unmappable: a special token whose role the source lacks, or text no source token covers -> the mean of all
  source rows.

An untied output head is built the same way from the source head's rows (and its bias, if any). `layers` keeps a
subset of decoder blocks; on a small model this destroys it (see docs/method.md), so it is off by default.

`build_student` returns the model in memory; `student_folder` builds it once into a folder under
`cache_dir()/students/`, keyed by a hash of the source, the tokenizer's vocabulary and the layer choice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.data.tokenization import load_tokenizer
from sra_distill.data.vocab import token_bytes
from sra_distill.errors import ConfigError, ModelSourceError
from sra_distill.models.sources import check_local_model, missing_source_error, publish_folder, resolve_model_source
from sra_distill.paths import cache_dir

_BUILD_FORMAT = 1  # bump when the construction changes, so cached students are rebuilt
ROLES = ("bos", "eos", "pad", "unk")


@dataclass
class TransferReport:
    """How each row of the new vocabulary was initialised."""

    copied: int = 0
    composed: int = 0
    by_role: int = 0
    unmappable: int = 0
    unmappable_tokens: list[str] = field(default_factory=list)  # the first few, for the message
    layers: list[int] | None = None  # decoder blocks kept (None = all)

    def summary(self) -> str:
        kept = "all layers" if self.layers is None else f"layers {self.layers}"
        text = (f"{self.copied} tokens copied, {self.composed} composed, {self.by_role} special tokens mapped by "
                f"role, {self.unmappable} unmappable (mean row); {kept}")
        if self.unmappable_tokens:
            text += f"; unmappable e.g. {self.unmappable_tokens}"
        return text


def _parse_layer_spec(spec: str) -> int | list[int]:
    """'15' -> 15 (a count); '0,1,2' or '0-13,28,29' -> an explicit list."""
    spec = spec.strip()
    if spec.isdigit():
        return int(spec)
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"--layers {spec!r}: expected a count (15) or a list of block indices (0-13,28,29)")
        layers.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return layers


def parse_layers(layers: int | list[int] | str | None, num_layers: int) -> list[int] | None:
    """The decoder blocks to keep, in order: a count (evenly spaced, first and last included) or explicit indices."""
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = _parse_layer_spec(layers)
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ConfigError(f"layers: a count must be in 1..{num_layers} for a model with {num_layers} blocks, "
                              f"got {layers}")
        if layers == num_layers:
            return None
        if layers == 1:
            return [num_layers - 1]
        return sorted({round(i * (num_layers - 1) / (layers - 1)) for i in range(layers)})
    kept = sorted(set(int(i) for i in layers))
    bad = [i for i in kept if not 0 <= i < num_layers]
    if not kept or bad:
        raise ConfigError(f"layers: block indices must be in 0..{num_layers - 1} for a model with {num_layers} "
                          f"blocks, got {bad or 'an empty list'}")
    return None if kept == list(range(num_layers)) else kept


def _block_list(model: PreTrainedModel) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) holding the decoder blocks."""
    num_layers = model.config.get_text_config().num_hidden_layers
    block_classes = set(model._no_split_modules or ())
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) == num_layers
                and all(type(m).__name__ in block_classes for m in module)):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ModelSourceError(f"{type(model).__name__}: no list of {num_layers} decoder blocks found; depth pruning does "
                           f"not support this architecture")


def keep_layers(model: PreTrainedModel, kept: list[int]) -> None:
    """Keep only the decoder blocks `kept` (in order), renumbering their KV-cache slots and the config."""
    parent, attr, blocks = _block_list(model)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # transformers' attention modules index the KV cache by it; others have none
                module.layer_idx = new_index
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)  # only the configs of architectures that mix layer kinds
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)


def _source_byte_index(source_tok: PreTrainedTokenizerBase) -> tuple[dict[bytes, int], dict[int, bytes]]:
    """bytes -> source id (regular tokens only; regular over byte-fallback, then lowest id), and id -> bytes."""
    by_id = token_bytes(source_tok)
    index: dict[bytes, int] = {}
    for token_id in sorted(by_id, key=lambda i: (by_id[i][1], i)):
        text, _is_byte_token = by_id[token_id]
        index.setdefault(text, token_id)
    return index, {i: b for i, (b, _) in by_id.items()}


def _greedy_cover(text: bytes, index: dict[bytes, int], longest: int) -> list[int] | None:
    ids, pos = [], 0
    while pos < len(text):
        for end in range(min(len(text), pos + longest), pos, -1):
            found = index.get(text[pos:end])
            if found is not None:
                ids.append(found)
                pos = end
                break
        else:
            return None
    return ids


def _compose(text: bytes, source_tok, index: dict[bytes, int], id_bytes: dict[int, bytes], longest: int):
    """Source ids whose bytes concatenate to `text`: the source tokenizer's own split where it reproduces them."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        decoded = None
    if decoded is not None:
        ids = source_tok.encode(decoded, add_special_tokens=False)
        if ids and b"".join(id_bytes.get(i, b"\0\0invalid") for i in ids) == text:
            return ids
    return _greedy_cover(text, index, longest)


def transfer_rows(
    source_rows: torch.Tensor,
    source_tok: PreTrainedTokenizerBase,
    target_tok: PreTrainedTokenizerBase,
    num_rows: int | None = None,
    report: TransferReport | None = None,
) -> torch.Tensor:
    """Rows for the target vocabulary (`[num_rows or len(target_tok), ...]`) built from `source_rows` as the module
    docstring says. `source_rows` is [source vocab rows, ...] (an embedding matrix, or a head bias as [V])."""
    report = report if report is not None else TransferReport()
    source_rows = source_rows.detach().float()
    fallback = source_rows[: len(source_tok)].mean(0)
    out = fallback.expand(num_rows or len(target_tok), *source_rows.shape[1:]).clone()
    index, id_bytes = _source_byte_index(source_tok)
    index = {b: i for b, i in index.items() if i < source_rows.shape[0]}
    longest = max(map(len, index), default=1)
    target_bytes = token_bytes(target_tok)
    role_ids = {getattr(target_tok, f"{r}_token_id"): getattr(source_tok, f"{r}_token_id") for r in reversed(ROLES)}
    special_ids = set(target_tok.all_special_ids)
    for token_id in range(out.shape[0]):
        if token_id in role_ids and role_ids[token_id] is not None and role_ids[token_id] < source_rows.shape[0]:
            out[token_id] = source_rows[role_ids[token_id]]
            report.by_role += 1
            continue
        entry = target_bytes.get(token_id)
        if entry is None or token_id in special_ids:
            report.unmappable += 1
            if len(report.unmappable_tokens) < 5:
                report.unmappable_tokens.append(target_tok.convert_ids_to_tokens(token_id))
            continue
        text = entry[0]
        if text in index:
            out[token_id] = source_rows[index[text]]
            report.copied += 1
            continue
        ids = _compose(text, source_tok, index, id_bytes, longest) if text else None
        if ids:
            out[token_id] = source_rows[torch.tensor(ids)].mean(0)
            report.composed += 1
        else:
            report.unmappable += 1
            if len(report.unmappable_tokens) < 5:
                report.unmappable_tokens.append(target_tok.convert_ids_to_tokens(token_id))
    return out


def build_student(
    source: str,
    tokenizer: str | PreTrainedTokenizerBase,
    layers: int | list[int] | str | None = None,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, TransferReport]:
    """Build (model, tokenizer, report): the model at `source` (any form the `teacher` setting takes except
    `random:`) re-tokenised for `tokenizer` (any form `student_tokenizer` takes), optionally depth-pruned."""
    if source.startswith(("random:", "from:")):
        raise ConfigError(f"student source {source!r}: expected a packaged model name, a directory or a .gguf file")
    location = resolve_model_source(source)
    check_local_model(location)
    target_tok = load_tokenizer(tokenizer, trust_remote_code, not allow_download) if isinstance(tokenizer, str) \
        else tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=not allow_download
        )
        source_tok = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=not allow_download
        )
    except OSError as exc:  # transformers' "not found / cannot connect" for a name that is no folder here
        if allow_download:
            raise
        raise missing_source_error(source, str(exc)) from None
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:  # PreTrainedModel's default when a class names no embedding
        embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise ModelSourceError(f"{source}: the model has no input embedding matrix to transfer "
                               f"(get_input_embeddings() gave {type(embeddings).__name__})")
    report = TransferReport()
    kept = parse_layers(layers, model.config.get_text_config().num_hidden_layers)
    if kept is not None:
        keep_layers(model, kept)
        report.layers = kept
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    head_weight = None if head is None or tied else head.weight.detach().clone()
    # An architecture's LM head need not be an nn.Linear (which always has `bias`, None when it has none).
    head_bias = None if head is None or getattr(head, "bias", None) is None else head.bias.detach().clone()
    input_rows = transfer_rows(embeddings.weight, source_tok, target_tok, report=report)
    dtype = embeddings.weight.dtype
    model.resize_token_embeddings(len(target_tok), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(input_rows.to(dtype))
        new_head = model.get_output_embeddings()
        if head_weight is not None:
            new_head.weight.copy_(transfer_rows(head_weight, source_tok, target_tok).to(dtype))
        if head_bias is not None:
            new_head.bias.copy_(transfer_rows(head_bias, source_tok, target_tok).to(dtype))
    special = {f"{role}_token_id": getattr(target_tok, f"{role}_token_id") for role in ("bos", "eos", "pad")}
    for key, value in special.items():
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    model.config.vocab_size = len(target_tok)
    return model, target_tok, report


def _source_fingerprint(location: str) -> str:
    """Identity of a model folder: its config and the size and modification time of every weight file."""
    folder = Path(location)
    parts = [str(folder.resolve())]
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    payload = [sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
               [getattr(tok, f"{r}_token") for r in ROLES], tok.backend_tokenizer.to_str()]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def student_folder(
    source: str,
    tokenizer: str,
    layers: int | list[int] | str | None = None,
    *,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    quiet: bool = False,
) -> Path:
    """A cached `save_pretrained` folder of `build_student(source, tokenizer, layers)`, built on first use."""
    location = resolve_model_source(source)
    target_tok = load_tokenizer(tokenizer, trust_remote_code, not allow_download)
    layer_key = layers if not isinstance(layers, str) else _parse_layer_spec(layers)
    key = hashlib.sha256(json.dumps(
        [_BUILD_FORMAT, _source_fingerprint(location), _tokenizer_fingerprint(target_tok), layer_key]
    ).encode()).hexdigest()[:16]
    name = f"{Path(location).name}-{Path(str(tokenizer)).name}-{key}"
    target = cache_dir() / "students" / name
    if (target / "config.json").exists():
        return target
    model, tok, report = build_student(
        source, target_tok, layers, trust_remote_code=trust_remote_code, allow_download=allow_download
    )
    if not quiet:
        print(f"student {source} with tokenizer {tokenizer}: {report.summary()} (cached in {target})", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(model, tok, report, tmp)
    publish_folder(tmp, target)
    return target


def save_student(model: PreTrainedModel, tok: PreTrainedTokenizerBase, report: TransferReport, folder: Path) -> None:
    """Write an ordinary Hugging Face folder (+ `transfer.json`, how each row was initialised)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tok = copy.copy(tok)  # the cached tokenizer object must not change
    tok.save_pretrained(folder)
    (folder / "transfer.json").write_text(json.dumps(asdict(report), indent=1))

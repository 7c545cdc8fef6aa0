"""Loading tokenizers, with each family's quirks kept as data in one table.

A tokenizer is named either by a key of `KNOWN_TOKENIZERS` (read from the data root's `tokenizers/` folder), or by a
local directory / hub id (loaded with `AutoTokenizer`, local files only unless remote access is allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sra_distill.errors import ModelSourceError, NotFoundError
from sra_distill.paths import data_root, data_root_note


@dataclass(frozen=True)
class TokenizerSpec:
    """How to load one tokenizer family from the data root, and its conventions."""

    folder: str
    # "auto": AutoTokenizer on the folder; "file": PreTrainedTokenizerFast(tokenizer_file=folder/tokenizer.json),
    # needed by SentencePiece families whose AutoTokenizer path mishandles leading spaces in transformers 5.x.
    loader: str = "auto"
    special_tokens: dict[str, str] = field(default_factory=dict)
    word_start_marker: str = "Ġ"  # what a word-initial space looks like inside token strings
    byte_fallback: bool = False  # SentencePiece <0xNN> byte tokens


def sentencepiece_spec(folder: str) -> TokenizerSpec:
    """A Llama-style SentencePiece tokenizer: ▁ marks a word start, <0xNN> byte tokens, <s> </s> <unk>."""
    return TokenizerSpec(folder, loader="file", special_tokens={"bos_token": "<s>", "eos_token": "</s>",
                                                                "unk_token": "<unk>"},
                         word_start_marker="▁", byte_fallback=True)


KNOWN_TOKENIZERS: dict[str, TokenizerSpec] = {
    "gpt2": TokenizerSpec("gpt2"),
    "qwen1.5": TokenizerSpec("qwen1.5"),
    "smollm2": TokenizerSpec("smollm2-135m-instruct"),
    "gpt-neox": TokenizerSpec("gpt-neox-20b", loader="file", special_tokens={"eos_token": "<|endoftext|>"}),
    "llama2": sentencepiece_spec("llama2"),
    "mistral": sentencepiece_spec("mistral-7b-v0.1"),
}
# Aliases users will type.
KNOWN_TOKENIZERS["tinyllama"] = KNOWN_TOKENIZERS["llama2"]
KNOWN_TOKENIZERS["qwen2"] = KNOWN_TOKENIZERS["qwen1.5"]
KNOWN_TOKENIZERS["pythia"] = KNOWN_TOKENIZERS["gpt-neox"]


def tokenizer_spec(tokenizer: PreTrainedTokenizerBase) -> TokenizerSpec:
    """The spec a tokenizer was loaded with, or one inferred from its vocabulary for tokenizers loaded elsewhere."""
    # load_tokenizer attaches the spec to the (transformers) tokenizer, so it travels with it into loader workers;
    # a tokenizer loaded elsewhere has none.
    spec = getattr(tokenizer, "_sra_spec", None)
    if spec is not None:
        return spec
    vocab = tokenizer.get_vocab()
    spm = sum(1 for t in vocab if t.startswith("▁")) > sum(1 for t in vocab if t.startswith("Ġ"))
    return TokenizerSpec(
        folder=str(tokenizer.name_or_path),
        word_start_marker="▁" if spm else "Ġ",
        byte_fallback="<0x0A>" in vocab,
    )


@lru_cache(maxsize=32)
def _load(name: str, trust_remote_code: bool, local_files_only: bool) -> PreTrainedTokenizerBase:
    spec = KNOWN_TOKENIZERS.get(name)
    if spec is not None:
        folder = data_root() / "tokenizers" / spec.folder
        if not folder.is_dir():
            raise NotFoundError(
                f"tokenizer {name!r}: folder {folder} not found ({data_root_note()})"
            )
        if spec.loader == "file":
            tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **spec.special_tokens)
        else:
            tok = AutoTokenizer.from_pretrained(str(folder), **spec.special_tokens)
        tok._sra_spec = spec
        tok.name_or_path = name
    else:
        try:
            tok = AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code, local_files_only=local_files_only
            )
        except OSError as err:  # transformers' "not found / cannot connect": name what is accepted instead
            known = ", ".join(sorted(KNOWN_TOKENIZERS))
            raise NotFoundError(f"tokenizer {name!r}: not a known name ({known}), a local tokenizer folder or a "
                                f"cached hub id ({str(err).splitlines()[0]})") from None
    if not tok.is_fast:
        raise ModelSourceError(
            f"tokenizer {name!r} is a slow (Python) tokenizer without offset mappings; span alignment needs a fast "
            f"tokenizer: provide a tokenizer.json or load it with use_fast=True"
        )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(
    name: str | Path, trust_remote_code: bool = False, local_files_only: bool = True
) -> PreTrainedTokenizerBase:
    """Load a fast tokenizer by known name (see `KNOWN_TOKENIZERS`), local directory or hub id.

    The result is cached per process; callers must not mutate it.
    """
    return _load(str(name), trust_remote_code, local_files_only)

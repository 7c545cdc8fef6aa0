"""Tokenize one record for each model: prompt, then response, then EOS, with response-relative offsets.

Per side (`encode_side`):

* prompt: `record.prompt`, or `record.messages` rendered by THAT tokenizer's chat template with
  `add_generation_prompt=True`; tokenized with the tokenizer's own special tokens (BOS where the family adds one;
  a chat template carries its own markers, so rendered chats are tokenized without adding more).
* response: tokenized on its own, without special tokens (special-token strings inside the text stay plain text),
  with `return_offsets_mapping=True`, so offsets index the response string, which both sides share; spans line
  up even where the two prompts differ. SentencePiece families give the first response word a leading "▁" (its
  offsets still start at 0); byte-level ones do not.
* EOS appended: label True, special True. Labels cover the response tokens and that EOS, and nothing else, even
  where pad == EOS (GPT-2, Qwen): downstream code must read labels from here, never from pad ids.
* Prompt and special tokens have offsets (0, 0); `response_start` is the index of the first response token.

Truncation policy (same on both sides; each side's `SideExample.truncation` says what was cut):

1. the prompt keeps its LAST `max_prompt_length` tokens, so "### Response:" stays next to the response; a leading
   BOS is kept in front (it counts towards `max_prompt_length`);
2. the response is then cut so that prompt + response + EOS fits `max_length`; when the response is cut, EOS no
   longer fits and is dropped (the sequence ends mid-response, as the text does).

Huge texts cost bounded time: before tokenising, a prompt keeps its last and a response its first `char_budget`
characters, a wide multiple of what the kept tokens can span (2 x tokens x the tokenizer's longest token, and at
least MIN_CHAR_BUDGET), so the kept tokens are those of the whole text while a 50 MB record tokenises in
milliseconds. Only texts longer than the budget are cut; their dropped-token counts are then lower bounds.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import numpy as np
from transformers import PreTrainedTokenizerBase

from sra_distill.data.batch import PairedExample, SideExample, SideTruncation
from sra_distill.data.records import Record
from sra_distill.data.spans import example_span_ids
from sra_distill.errors import ConfigError, DataError, ModelSourceError


@dataclass
class TruncationCounts:
    """Truncation over many examples, per side: how many examples lost prompt / response tokens / their EOS."""

    examples: int = 0
    prompt_truncated: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    response_truncated: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    eos_dropped: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    # Responses whose two tokenizations share no cut point inside what both sides keep: no span, so the span losses
    # (SRA) get nothing from them and only the CE term trains on them.
    no_shared_spans: int = 0
    teacher_tokenized: bool = True  # False when the method reads the student's side only (SFT)

    def add(self, student: SideTruncation, teacher: SideTruncation | None) -> None:
        self.examples += 1
        self.teacher_tokenized = teacher is not None
        for side, cut in (("student", student), ("teacher", teacher)):
            if cut is not None:
                self.prompt_truncated[side] += cut.prompt_tokens_dropped > 0
                self.response_truncated[side] += cut.response_tokens_dropped > 0
                self.eos_dropped[side] += cut.eos_dropped

    def summary(self, over: str | None = None) -> str:
        """One line of counts; `over` names the records counted (default: "N examples")."""
        parts = [
            f"{side}: prompt cut {self.prompt_truncated[side]}, response cut {self.response_truncated[side]}, "
            f"EOS dropped {self.eos_dropped[side]}"
            for side in (("student", "teacher") if self.teacher_tokenized else ("student",))
        ]
        spans = (f"; {self.no_shared_spans} responses share no span boundary between the tokenizers (no span loss)"
                 if self.teacher_tokenized else "")
        return f"truncation over {over or f'{self.examples} examples'}; " + "; ".join(parts) + spans


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(tokenizer.name_or_path or type(tokenizer).__name__)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token: BOS/EOS/pad/unk and added special tokens such as chat markers."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


MIN_CHAR_BUDGET = 1 << 15  # texts up to this many characters are never cut (exact truncation counts)


def char_budget(tokenizer: PreTrainedTokenizerBase, tokens: int) -> int:
    """Characters that always hold more than `tokens` tokens' worth of text: 2 x tokens x the longest token string
    (a vocabulary string is never shorter than the text it covers: byte-level vocabularies spell one byte per
    character, SentencePiece one character per character). The longest token is looked up once per tokenizer."""
    # Cached on the tokenizer (a transformers object, no field of ours) so it travels with it into loader workers.
    longest = getattr(tokenizer, "_sra_longest_token", None)
    if longest is None:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
        tokenizer._sra_longest_token = longest
    return max(MIN_CHAR_BUDGET, 2 * tokens * max(1, longest))


def keep_tail_chars(text: str, tokenizer: PreTrainedTokenizerBase, tokens: int) -> str:
    """The last `char_budget` characters of a long prompt (a leading BOS string stays in front)."""
    if len(text) <= MIN_CHAR_BUDGET:  # shorter than any budget: nothing to cut, no vocabulary scan
        return text
    budget = char_budget(tokenizer, tokens)
    if len(text) <= budget:
        return text
    bos = tokenizer.bos_token if isinstance(tokenizer.bos_token, str) and text.startswith(tokenizer.bos_token) else ""
    return bos + text[len(text) - budget :]


def response_char_limit(record: Record, tokenizer: PreTrainedTokenizerBase, tokens: int) -> int | None:
    """How many leading characters of a long response can matter for `tokens` tokens (None: all of them)."""
    if len(record.response) <= MIN_CHAR_BUDGET:
        return None
    budget = char_budget(tokenizer, tokens)
    return budget if len(record.response) > budget else None


def _prompt_ids(record: Record, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None = None) -> list[int]:
    if record.messages is None:
        prompt = record.prompt
        if max_prompt_length is not None:
            prompt = keep_tail_chars(prompt, tokenizer, max_prompt_length)
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not tokenizer.chat_template:
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template, so it cannot render the chat record "
            f"{record.source} line {record.line}; use a tokenizer with a chat template or prompt-format data"
        )
    text = tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    if max_prompt_length is not None:
        text = keep_tail_chars(text, tokenizer, max_prompt_length)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """Reject length limits that leave no room for a response."""
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise ConfigError(
            f"need 1 <= max_prompt_length < max_length (room for at least one response token), got "
            f"max_prompt_length={max_prompt_length}, max_length={max_length}"
        )


def response_text(record: Record, max_chars: int | None = None) -> str:
    """The response both sides tokenize, in Unicode NFC: some tokenizers (Qwen, GPT-NeoX) normalise to NFC inside
    and then report offsets that no longer cover combining marks, so both sides get the composed text up front.
    `max_chars`: only that many leading characters (see `response_char_limit`)."""
    return unicodedata.normalize("NFC", record.response if max_chars is None else record.response[:max_chars])


def _truncate_prompt(prompt: list[int], tokenizer: PreTrainedTokenizerBase, max_prompt_length: int) -> list[int]:
    """Keep the last tokens (the "### Response:" seam), and a leading BOS in front of them."""
    if len(prompt) <= max_prompt_length:
        return prompt
    keep_bos = tokenizer.bos_token_id is not None and prompt[0] == tokenizer.bos_token_id
    head = prompt[:1] if keep_bos else []
    return head + prompt[len(prompt) - (max_prompt_length - len(head)) :]


def encode_response_after_prompt(
    prompt: list[int], response: str, tokenizer: PreTrainedTokenizerBase, max_length: int, end_with_eos: bool = True
) -> tuple[SideExample, int, bool]:
    """One side's example from already-truncated prompt ids and an NFC response string (policy step 2 of the module
    docstring): the response tokenized on its own with offsets, cut to fit `max_length`, EOS appended when it fits
    and `end_with_eos` (False for a generated response that hit its length limit: the text did not end there).
    Returns the example, the number of response tokens cut and whether EOS was dropped for lack of room."""
    if tokenizer.eos_token_id is None:
        raise ModelSourceError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no EOS token to end the response with")
    encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    ids = encoded["input_ids"]
    budget = max_length - len(prompt)
    response_dropped = max(0, len(ids) - budget)
    ids = ids[:budget]
    fits = len(ids) < budget  # a cut response fills the budget exactly, leaving no room for EOS
    has_eos = fits and end_with_eos

    special_ids = _special_ids(tokenizer)
    n_prompt, n_response = len(prompt), len(ids)
    # An int array (not a list of tuples): the span aligner in the data-loader workers reads it without conversion.
    offsets = np.zeros((n_prompt + n_response + int(has_eos), 2), dtype=np.int64)
    if n_response:
        offsets[n_prompt : n_prompt + n_response] = np.asarray(encoded["offset_mapping"][:budget], dtype=np.int64)
    side = SideExample(
        input_ids=list(prompt) + ids + ([tokenizer.eos_token_id] if has_eos else []),
        offsets=offsets,
        special=[i in special_ids for i in prompt] + [False] * n_response + ([True] if has_eos else []),
        is_target=[False] * n_prompt + [True] * n_response + ([True] if has_eos else []),
        response_start=n_prompt,
    )
    return side, response_dropped, not fits


def encode_side(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> SideExample:
    """One tokenizer's encoding of a record (see the module docstring for the layout and truncation policy), with
    what truncation removed in its `truncation`."""
    check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise ModelSourceError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no EOS token to end the response with")
    full_prompt = _prompt_ids(record, tokenizer, max_prompt_length)
    prompt = _truncate_prompt(full_prompt, tokenizer, max_prompt_length)
    side, response_dropped, eos_dropped = encode_response_after_prompt(
        prompt, response_text(record, response_char_limit(record, tokenizer, max_length)), tokenizer, max_length
    )
    side.truncation = SideTruncation(len(full_prompt) - len(prompt), response_dropped, eos_dropped)
    return side


def pair_example(
    record: Record,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    max_length: int = 512,
    max_prompt_length: int = 256,
) -> PairedExample:
    """The student's and the teacher's encodings of one record, sharing the response text their offsets index
    (without a teacher tokenizer, for a method that reads the student alone, the student's only)."""
    tokenizers = [tok for tok in (student_tokenizer, teacher_tokenizer) if tok is not None]
    student = encode_side(record, student_tokenizer, max_length, max_prompt_length)
    teacher = None if teacher_tokenizer is None else encode_side(record, teacher_tokenizer, max_length, max_prompt_length)
    limits = [response_char_limit(record, tok, max_length) for tok in tokenizers]
    # Each side's offsets index a prefix of this text (the longer cut, or all of it).
    text = response_text(record, None if None in limits else max(limits))
    return PairedExample(student, teacher, text)


def count_truncation(
    records: list[Record],
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    max_length: int = 512,
    max_prompt_length: int = 256,
) -> TruncationCounts:
    """How many records each side truncates (for a report before training; pairs every record once)."""
    counts = TruncationCounts()
    for record in records:
        example = pair_example(record, student_tokenizer, teacher_tokenizer, max_length, max_prompt_length)
        s, t = example.student, example.teacher
        counts.add(s.truncation, None if t is None else t.truncation)
        if t is not None:
            counts.no_shared_spans += example_span_ids(example)[2] == 0
    return counts

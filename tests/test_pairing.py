"""Paired tokenization on every real tokenizer family: seam, labels, offsets, specials, chat prompts, truncation."""

from __future__ import annotations

import unicodedata

import pytest

from sra_distill.data.pairing import (
    count_truncation,
    encode_side,
    pair_example,
)
from sra_distill.data.records import Record, load_records
from sra_distill.data.spans import align_spans
from sra_distill.data.tokenization import load_tokenizer

FAMILIES = ["gpt2", "qwen1.5", "smollm2", "gpt-neox", "llama2", "mistral"]
ADDS_BOS = {"llama2", "mistral"}


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Real records: no-input and with-input Dolly prompts, S-NI lists, non-ASCII and combining characters."""
    dolly = load_records("dolly/train.jsonl", limit=40)
    sinst = load_records("sinst/11_/valid.jsonl")
    picked = [r for r in sinst if any(ord(c) > 127 for c in r.response)][:5] + sinst[:5]
    extra = Record("P:\n", "Tabs\tand  spaces, 日本語 😀, e\u0301t\u00e9 end ", ["x"], None, "test", 1)
    return dolly + picked + [extra]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def response_tokens(side) -> list[int]:
    return [i for i, label, special in zip(side.input_ids, side.is_target, side.special) if label and not special]


def check_side(side, record: Record, tokenizer) -> None:
    start = side.response_start
    n = len(side.input_ids)
    assert len(side.offsets) == len(side.special) == len(side.is_target) == n
    # Prompt: exactly the tokenizer's own encoding of the prompt text, specials included; no labels, offsets (0, 0).
    assert side.input_ids[:start] == tokenizer(record.prompt)["input_ids"]
    assert not any(side.is_target[:start])
    assert side.offsets[:start].tolist() == [[0, 0]] * start
    # Response then EOS: all labelled, EOS last and special, even where pad == EOS.
    assert all(side.is_target[start:])
    assert side.input_ids[-1] == tokenizer.eos_token_id and side.special[-1] and side.offsets[-1].tolist() == [0, 0]
    assert not any(side.special[start:-1])
    body = side.input_ids[start:-1]
    assert response_tokens(side) == body
    # The tokenizer's normaliser (NFC for Qwen, GPT-NeoX) shows in decoded text, not in the offsets.
    decoded = tokenizer.decode(body, clean_up_tokenization_spaces=False)
    assert decoded in (record.response, nfc(record.response))
    text = nfc(record.response)  # offsets index the NFC response (pairing.response_text)
    offsets = [tuple(o) for o in side.offsets[start:-1].tolist()]
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert [b for _, b in offsets] == sorted(b for _, b in offsets)
    assert offsets[-1][1] in (len(text), len(text.rstrip()))
    for token_id, (a, b) in zip(body, offsets):
        piece = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        # Whole characters only (byte pieces of one character decode to U+FFFD); a bare "▁" decodes to "" and
        # SentencePiece's dummy prefix "▁" shares the next token's offsets, e.g. "▁" (0, 1), "1" (0, 1).
        if piece.strip() and "\ufffd" not in piece:
            assert nfc(piece).strip() == nfc(text[a:b]).strip(), (piece, text[a:b])


@pytest.mark.parametrize("family", FAMILIES)
def test_seam_labels_and_offsets_on_real_tokenizers(family, records):
    tokenizer = load_tokenizer(family)
    for record in records:
        side = encode_side(record, tokenizer, max_length=4096, max_prompt_length=2048)
        check_side(side, record, tokenizer)
        assert side.special[0] == (family in ADDS_BOS)
        if family in ADDS_BOS:
            assert side.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("family", ["gpt2", "qwen1.5"])
def test_pad_equal_to_eos_keeps_the_eos_label(family, records):
    tokenizer = load_tokenizer(family)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    side = encode_side(records[0], tokenizer, 4096, 2048)
    assert side.input_ids[-1] == tokenizer.pad_token_id and side.is_target[-1]


def test_first_response_token_offsets_per_family():
    """Byte-level BPEs and SentencePiece both start the separately-encoded response at character 0."""
    record = Record("Q:\n", "Hello world", ["Hello world"], None, "test", 1)
    for family in FAMILIES:
        tokenizer = load_tokenizer(family)
        side = encode_side(record, tokenizer, 64, 32)
        first = side.response_start
        assert side.offsets[first].tolist() == [0, 5], family
        assert tokenizer.convert_ids_to_tokens(side.input_ids[first]) in ("Hello", "▁Hello"), family


def test_special_token_strings_inside_a_response_stay_text():
    tokenizer = load_tokenizer("qwen1.5")
    record = Record("Q:\n", "Type <|endoftext|> or <|im_end|> literally.", ["x"], None, "test", 1)
    side = encode_side(record, tokenizer, 128, 64)
    body = side.input_ids[side.response_start : -1]
    assert not set(body) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(body) == record.response


CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one, please?"},
]


@pytest.mark.parametrize("family", ["smollm2", "qwen1.5"])
def test_chat_prompt_uses_each_tokenizers_template(family):
    tokenizer = load_tokenizer(family)
    record = Record(None, "Blue, like the sky.", ["Blue, like the sky."], CHAT, "chat.jsonl", 7)
    side = encode_side(record, tokenizer, 256, 128)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    start = side.response_start
    assert side.input_ids[:start] == prompt_ids
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert [s for i, s in zip(prompt_ids, side.special) if i == im_start] == [True] * prompt_ids.count(im_start)
    assert tokenizer.decode(response_tokens(side)) == record.response
    assert side.is_target == [False] * start + [True] * (len(side.input_ids) - start)


def test_chat_pair_spans_line_up_although_templates_differ():
    student, teacher = load_tokenizer("smollm2"), load_tokenizer("qwen1.5")
    response = "Blue, like the sky on a clear day."
    pair = pair_example(Record(None, response, [response], CHAT, "chat.jsonl", 1), student, teacher, 256, 128)
    assert pair.student.response_start != pair.teacher.response_start  # SmolLM2 adds a default system prompt
    s, t = pair.student, pair.teacher
    spans = align_spans(s.offsets, t.offsets, s.response_start, t.response_start, student_special=s.special,
                        teacher_special=t.special)
    assert spans
    for s_begin, s_end, t_begin, t_end in spans:
        assert s.offsets[s_end - 1][1] == t.offsets[t_end - 1][1]
    assert "".join(student.decode(s.input_ids[a:b]) for a, b, _, _ in spans) == response


def test_chat_record_on_tokenizer_without_template_names_it():
    record = Record(None, "Blue.", ["Blue."], CHAT, "chat.jsonl", 3)
    with pytest.raises(ValueError, match=r"tokenizer 'gpt2' has no chat template.*chat.jsonl line 3"):
        encode_side(record, load_tokenizer("gpt2"), 64, 32)


LONG = Record("word " * 300 + "\n\n### Response:\n", "answer " * 200, ["x"], None, "test", 1)


@pytest.mark.parametrize("family", ["gpt2", "llama2"])
def test_truncation_keeps_the_last_prompt_tokens_and_bos(family):
    tokenizer = load_tokenizer(family)
    full_prompt = tokenizer(LONG.prompt)["input_ids"]
    side = encode_side(LONG, tokenizer, max_length=64, max_prompt_length=16)
    cut = side.truncation
    assert side.response_start == 16
    if family in ADDS_BOS:
        assert side.input_ids[:16] == full_prompt[:1] + full_prompt[-15:]
    else:
        assert side.input_ids[:16] == full_prompt[-16:]
    assert tokenizer.decode(side.input_ids[:16]).endswith("### Response:\n")
    # The response fills the rest; EOS no longer fits.
    full_response = tokenizer(LONG.response, add_special_tokens=False)["input_ids"]
    assert len(side.input_ids) == 64
    assert side.input_ids[16:] == full_response[:48]
    assert all(side.is_target[16:]) and not any(side.special[16:])
    assert cut.prompt_tokens_dropped == len(full_prompt) - 16
    assert cut.response_tokens_dropped == len(full_response) - 48 and cut.eos_dropped


def test_response_that_exactly_fills_drops_only_the_eos():
    tokenizer = load_tokenizer("gpt2")
    record = Record("Q:\n", "one two three", ["x"], None, "test", 1)
    n_prompt = len(tokenizer(record.prompt)["input_ids"])
    n_response = len(tokenizer(record.response, add_special_tokens=False)["input_ids"])
    side = encode_side(record, tokenizer, n_prompt + n_response, n_prompt)
    cut = side.truncation
    assert len(side.input_ids) == n_prompt + n_response and side.is_target[-1] and not side.special[-1]
    assert (cut.prompt_tokens_dropped, cut.response_tokens_dropped, cut.eos_dropped) == (0, 0, True)
    side = encode_side(record, tokenizer, n_prompt + n_response + 1, n_prompt)
    cut = side.truncation
    assert side.input_ids[-1] == tokenizer.eos_token_id and not cut.eos_dropped


def test_count_truncation_and_length_checks():
    gpt2, llama = load_tokenizer("gpt2"), load_tokenizer("llama2")
    short = Record("Q:\n", "Yes.", ["Yes."], None, "test", 1)
    counts = count_truncation([LONG, short, LONG], gpt2, llama, max_length=64, max_prompt_length=16)
    assert counts.examples == 3
    assert counts.prompt_truncated == counts.response_truncated == counts.eos_dropped == {"student": 2, "teacher": 2}
    assert "over 3 examples" in counts.summary()
    for max_length, max_prompt_length in [(16, 16), (16, 0), (8, 20)]:
        with pytest.raises(ValueError, match="max_prompt_length"):
            pair_example(short, gpt2, llama, max_length, max_prompt_length)

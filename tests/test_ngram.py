"""The batched no-repeat-n-gram processor bans exactly what Hugging Face's rule bans, and generation with it gives
the same tokens as `model.generate(no_repeat_ngram_size=n)`."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList, NoRepeatNGramLogitsProcessor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sra_distill.data.records import load_records  # noqa: E402
from sra_distill.data.tokenization import load_tokenizer  # noqa: E402
from sra_distill.evaluation.generate import generate  # noqa: E402
from sra_distill.evaluation.ngram import BatchedNoRepeatNGramProcessor, banned_ngram_mask  # noqa: E402
from sra_distill.paths import data_root  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_banned(row: list[int], n: int) -> set[int]:
    """The rule as written in fairseq / transformers 4.x: a dict from every (n-1)-gram of the row to the tokens
    that followed it; the banned tokens are those that followed the row's last n-1 tokens."""
    followers: dict[tuple[int, ...], list[int]] = {}
    for start in range(len(row) - n + 1):
        gram = tuple(row[start : start + n])
        followers.setdefault(gram[:-1], []).append(gram[-1])
    if len(row) + 1 < n:
        return set()
    return set(followers.get(tuple(row[len(row) - n + 1 :]), []))


def hf_banned(input_ids: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    scores = torch.zeros(input_ids.shape[0], vocab)
    return torch.isinf(NoRepeatNGramLogitsProcessor(n)(input_ids, scores))


def ours_banned(input_ids: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    scores = torch.randn(input_ids.shape[0], vocab)
    out = BatchedNoRepeatNGramProcessor(n)(input_ids, scores.clone())
    kept = ~torch.isinf(out)
    assert torch.equal(out[kept], scores[kept])  # only banned entries change
    return torch.isinf(out)


def check_all_agree(input_ids: torch.Tensor, n: int, vocab: int) -> int:
    """Asserts ours == installed transformers == plain reference; returns how many tokens were banned."""
    ours = ours_banned(input_ids, n, vocab)
    assert torch.equal(ours, hf_banned(input_ids, n, vocab))
    for row, banned in zip(input_ids.tolist(), ours):
        expected = {t for t in reference_banned(row, n) if t < vocab}
        assert set(banned.nonzero().flatten().tolist()) == expected
    return int(ours.sum())


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 7),
    batch=st.integers(1, 6),
    length=st.integers(0, 40),
    vocab=st.integers(2, 6),
    pad_columns=st.integers(0, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_rows_ban_the_same_tokens(n, batch, length, vocab, pad_columns, seed):
    """Tiny vocabularies make repeats (and so bans) frequent; left padding as in evaluation: pads are tokens too."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(0, vocab, (batch, length), generator=gen)
    pad = vocab - 1
    lead = torch.randint(0, pad_columns + 1, (batch,), generator=gen)
    padding = torch.randint(0, vocab, (batch, pad_columns), generator=gen)
    padding[torch.arange(pad_columns)[None, :] < lead[:, None]] = pad  # ragged: row i starts with lead[i] pads
    check_all_agree(torch.cat([padding, body], dim=1), n, vocab)


def test_ids_beyond_the_output_head_are_ignored():
    """An embedding table larger than the head: ids >= the score width cannot be sampled, so they ban nothing."""
    ids = torch.tensor([[1, 2, 9, 1, 2, 3, 1, 2]])
    assert check_all_agree(ids, 3, 5) == 1  # after "1 2": 9 is past the head (vocab 5), 3 is banned
    assert ours_banned(ids, 3, 5)[0].nonzero().flatten().tolist() == [3]


def test_edge_lengths_and_bad_sizes():
    ids = torch.tensor([[4, 4, 4]])
    assert check_all_agree(ids, 4, 8) == 0  # shorter than n: nothing to ban
    assert check_all_agree(ids, 3, 8) == 1  # "4 4" was followed by 4
    assert check_all_agree(ids, 1, 8) == 1  # n = 1: every token seen is banned
    assert not banned_ngram_mask(torch.zeros((2, 0), dtype=torch.long), 2, 8).any()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="ngram_size"):
            BatchedNoRepeatNGramProcessor(bad)
    with pytest.raises(ValueError, match="ngram_size"):
        banned_ngram_mask(ids, 0, 8)


def test_real_token_sequences_ban_the_same_tokens():
    """Every prefix of real prompt + response sequences (Dolly train, Llama-2 and GPT-2 tokenizers), n = 2..6."""
    records = load_records(data_root() / "dolly/train.jsonl", limit=12)
    total_banned = 0
    for name in ("gpt2", "llama2"):
        tok = load_tokenizer(name)
        rows = [tok(r.prompt + r.references[0])["input_ids"][:160] for r in records]
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padded
        for n in (2, 3, 6):
            for cut in range(1, width + 1, 3):
                total_banned += check_all_agree(ids[:, :cut], n, len(tok))
    assert total_banned > 100  # the real text does repeat n-grams, so the comparison is not between empty sets


@pytest.fixture(scope="module")
def tiny_model(tiny_gpt2):
    # Large init: confident logits, so greedy decoding of a random model loops and the n-gram rule has work to do.
    return tiny_gpt2(initializer_range=0.5)


PROMPTS = [
    "Below is an instruction.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
    "the the the the",
    "A much longer prompt about the weather in the mountains of northern Spain on a cold winter day is",
    "x",
]


@pytest.fixture(scope="module")
def small_vocab_model():
    """A 12-token vocabulary: generated sequences repeat n-grams often, so the rule bans something at most steps."""
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=12, n_embd=16, n_layer=2, n_head=2, n_positions=128, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_generation_gives_the_same_tokens_as_hf(small_vocab_model, n, do_sample):
    """Left-padded batch, same seed: tokens with our processor == tokens with generate's own no_repeat_ngram_size."""
    gen = torch.Generator().manual_seed(n)
    input_ids = torch.randint(1, 12, (5, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    for row, n_pads in enumerate([0, 3, 8, 1, 5]):  # ragged left padding with pad id 0
        input_ids[row, :n_pads] = 0
        attention_mask[row, :n_pads] = 0
    # n = 1 bans every token seen, so fewer new tokens than the vocabulary
    common = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3 if n == 1 else 40,
                  do_sample=do_sample, pad_token_id=0, eos_token_id=None,
                  **(dict(top_k=0, top_p=1.0, temperature=1.0) if do_sample else {}))

    def run(**kwargs):
        torch.manual_seed(7)
        return small_vocab_model.generate(**common, **kwargs)

    hf = run(no_repeat_ngram_size=n)
    ours = run(logits_processor=LogitsProcessorList([BatchedNoRepeatNGramProcessor(n)]))
    assert torch.equal(ours, hf)
    assert not torch.equal(run(), hf)  # the rule changed the output, so the equality above is a real test


@pytest.mark.parametrize("n", [2, 6])
def test_evaluate_generate_matches_plain_generate(tiny_model, gpt2_tok, n):
    """`sra evaluate`'s generation (our processor) decodes to the same replies as `generate` with HF's rule."""
    enc = gpt2_tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")

    def plain(size):
        out = tiny_model.generate(**enc, max_new_tokens=30, do_sample=False, no_repeat_ngram_size=size,
                                  pad_token_id=gpt2_tok.eos_token_id)
        return [t.strip() for t in gpt2_tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

    replies = generate(tiny_model, gpt2_tok, PROMPTS, seed=0, batch_size=len(PROMPTS), max_new_tokens=30,
                       do_sample=False, no_repeat_ngram_size=n)
    assert replies == plain(n)  # generate() sorts by length: every prompt must also keep its own reply
    if n == 2:
        assert replies != plain(0)  # the rule fired

"""No-repeat-n-gram banning for `generate`, in batched tensor ops.

The rule is Hugging Face's `no_repeat_ngram_size` (from fairseq): before each new token, every token that would
complete an n-gram already present in the row (prompt, padding and generated tokens alike) is banned. transformers
before mid-2026 implemented it with a Python dict of every n-gram of every row, rebuilt at every step (plus a
device-to-host copy); the versions this project allows (>=5.0) include those. This processor does the same
lookup for all rows at once, so its cost does not depend on the transformers version.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def banned_ngram_mask(input_ids: torch.Tensor, ngram_size: int, vocab_size: int) -> torch.Tensor:
    """Bool mask (batch, vocab_size): True where the next token would repeat an n-gram of its row.

    The next token t repeats an n-gram if the row's last n-1 tokens followed by t occur somewhere in the row, i.e.
    for some window start j, ids[j : j+n-1] equals the suffix and t = ids[j+n-1]. Ids >= vocab_size (embeddings
    larger than the output head) cannot be sampled and are ignored.
    """
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
    batch, length = input_ids.shape
    banned = torch.zeros((batch, vocab_size + 1), dtype=torch.bool, device=input_ids.device)
    n_windows = length - ngram_size + 1  # full n-grams in the row
    if n_windows <= 0:
        return banned[:, :vocab_size]
    suffix_start = length - ngram_size + 1  # the last n-1 tokens
    matches = torch.ones((batch, n_windows), dtype=torch.bool, device=input_ids.device)
    for offset in range(ngram_size - 1):  # compare one column of every window with one suffix token at a time
        matches &= input_ids[:, offset : offset + n_windows] == input_ids[:, suffix_start + offset, None]
    completions = input_ids[:, ngram_size - 1 :]
    # Every write is True; windows that do not match (and ids past the head) write to a spare last column, so no
    # data-dependent shapes and no host sync.
    targets = torch.where(matches & (completions < vocab_size), completions, vocab_size)
    banned.scatter_(1, targets, True)
    return banned[:, :vocab_size]


class BatchedNoRepeatNGramProcessor(LogitsProcessor):
    """Sets to -inf the score of every token that would repeat an n-gram of size `ngram_size` in its row; bans the
    same tokens as transformers' `NoRepeatNGramLogitsProcessor(ngram_size)`."""

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, int) or isinstance(ngram_size, bool) or ngram_size < 1:
            raise ValueError(f"ngram_size must be a positive integer, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.ngram_size:  # no complete n-gram yet
            return scores
        banned = banned_ngram_mask(input_ids, self.ngram_size, scores.shape[-1])
        return scores.masked_fill(banned, -float("inf"))

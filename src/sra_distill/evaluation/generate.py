"""Generation from prompts in left-padded batches: what `sra evaluate`, the training-time dev score, the demo and
on-policy training all run.

* `encode_prompts`: prompt token ids that keep leading special tokens (BOS) and the LAST tokens of the text, so the
  instruction tail and "### Response:" survive truncation.
* `left_pad`: batches are LEFT-padded so every prompt ends at the same position and generation continues right
  after it; `pad_token_id` is the tokenizer's pad token, or its EOS when it has none.
* `generation_config`: the settings a model's own `generation_config` could otherwise slip in (Qwen ships
  repetition_penalty 1.05, top_k 20, temperature 0.7) are pinned to neutral values.
* `generate_new_tokens`: one left-padded batch through `model.generate`, in eval mode, the new tokens only.
* `generate`: responses to prompt strings, seeded, longest prompts first, with the batched no-repeat-n-gram rule
  and the prompt and new tokens fitted to the model's context window.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from sra_distill.data.pairing import keep_tail_chars
from sra_distill.errors import ConfigError, DataError, ModelSourceError
from sra_distill.evaluation.ngram import BatchedNoRepeatNGramProcessor

NO_REPEAT_NGRAM_SIZE = 6

# Settings pinned to neutral values: `generate` fills every setting left unset from the model's own
# generation_config, which would change the protocol for teachers. The sampling ones are only passed when sampling
# (greedy would warn they are unused).
NEUTRAL_ALWAYS = dict(repetition_penalty=1.0, num_beams=1, num_return_sequences=1, min_length=0)
NEUTRAL_SAMPLING = dict(
    temperature=1.0,
    top_p=1.0,
    top_k=0,  # 0 disables top-k filtering
    min_p=0.0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
)


def context_window(model: PreTrainedModel) -> int | None:
    """Positions the model can attend over (prompt + generated tokens), from its config; None when it names none."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)  # transformers configs name the context length per architecture
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_to_context(window: int | None, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens, new tokens) that fit `window`: unchanged when they do; else the new tokens are capped to what
    is left after the prompt, the prompt keeping at most half the window when both are too long."""
    if window is None or max_prompt_tokens + max_new_tokens <= window:
        return max_prompt_tokens, max_new_tokens
    new = min(max_new_tokens, window - min(max_prompt_tokens, window // 2))
    return min(max_prompt_tokens, window - new), new


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt, keeping leading special tokens (BOS) and the last tokens of the text."""
    special = set(tokenizer.all_special_ids)
    encoded = []
    prompts = [keep_tail_chars(p, tokenizer, max_prompt_tokens) for p in prompts]  # a huge prompt: cut by characters
    for index, ids in enumerate(tokenizer(list(prompts), add_special_tokens=True)["input_ids"]):
        if not ids:
            raise DataError(f"prompt {index} encodes to no tokens; generation needs a non-empty prompt")
        n_lead = 0
        while n_lead < len(ids) and ids[n_lead] in special:
            n_lead += 1
        keep = max_prompt_tokens - n_lead
        if keep <= 0:
            raise ConfigError(f"max_prompt_tokens={max_prompt_tokens} leaves no room after {n_lead} special tokens")
        encoded.append(ids[:n_lead] + ids[n_lead:][-keep:])
    return encoded


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that left-pads a batch: the pad token, or EOS when the tokenizer has none (GPT-2)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ModelSourceError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
    return pad_id


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [rows, longest prompt]: each prompt right-aligned, pads and mask 0 before it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **settings) -> GenerationConfig:
    """A `GenerationConfig` of `settings` (must include `do_sample`) over the neutral values, stopping at the
    model's configured end token(s), else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    neutral = {**NEUTRAL_ALWAYS, **(NEUTRAL_SAMPLING if settings["do_sample"] else {})}
    return GenerationConfig(**{**neutral, **settings}, eos_token_id=eos)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (dropout off) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_new_tokens(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], config: GenerationConfig,
    logits_processor: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """The tokens `model.generate` adds after one left-padded batch of prompt ids [rows, new tokens] (rows that end
    early are padded with `config.pad_token_id`), in eval mode."""
    input_ids, attention_mask = left_pad(prompts, config.pad_token_id)
    device = model.device
    with eval_mode(model):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, logits_processor=logits_processor)
    return out[:, input_ids.shape[1] :]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    seed: int,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    max_new_tokens: int = 256,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE,
    on_batch: Callable[[int], None] | None = None,
    on_results: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """Responses to `prompts` (same order), generated in left-padded batches after seeding everything with `seed`.

    The tokenizer is only read (padding is done here), so a shared tokenizer is safe to pass. `on_batch(n)` is
    called after each batch of n prompts (progress bars), `on_results(indices, responses)` with that batch's
    responses (kept if the run is interrupted). Prompt and new tokens are fitted to the model's context window
    (`fit_to_context`).
    """
    if batch_size < 1 or max_new_tokens < 1 or max_prompt_tokens < 1:
        raise ConfigError(
            f"generate: batch_size ({batch_size}), max_new_tokens ({max_new_tokens}) and max_prompt_tokens "
            f"({max_prompt_tokens}) must be >= 1"
        )
    max_prompt_tokens, max_new_tokens = fit_to_context(context_window(model), max_prompt_tokens, max_new_tokens)
    config = generation_config(
        model,
        tokenizer,
        pad_token_id=pad_token_id(tokenizer),
        do_sample=do_sample,
        max_new_tokens=max_new_tokens,
        # 0 here (not unset, so a model's own setting cannot creep in): the rule is applied by our batched
        # processor instead, which bans the same tokens without a Python loop per row and step.
        no_repeat_ngram_size=0,
        **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}),
    )
    processors = LogitsProcessorList(
        [BatchedNoRepeatNGramProcessor(no_repeat_ngram_size)] if no_repeat_ngram_size > 0 else []
    )
    set_seed(seed)
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    # Longest first: similar lengths share a batch (less padding) and the memory peak shows up at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new_tokens = generate_new_tokens(model, [encoded[i] for i in chunk], config, processors)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            responses[i] = text.strip()
        if on_results is not None:
            on_results(chunk, [responses[i] for i in chunk])
        if on_batch is not None:
            on_batch(len(chunk))
    return responses

"""On-policy cross-tokenizer distillation: the student answers the batch's prompts, the teacher scores the answers.

GKD (Agarwal et al., 2024) and its relatives (MiniLLM, DistiLLM, TRL's `lmbda`) train the student on its own
samples, so it learns to recover from its own mistakes instead of only imitating reference answers. Across
tokenizers the teacher cannot read the student's token ids, but it can read the student's TEXT: this module turns a
dataset micro-batch into an on-policy one by

1. generating a response for every prompt of the batch with the student (`evaluation/generate.py`: eval mode, KV
   cache, left-padded batch, the evaluation's pinned neutral settings, `torch.no_grad`), sampling at
   `on_policy.temperature` / `on_policy.top_p`, at most `on_policy.max_new_tokens`, starting from the exact student
   prompt tokens of the batch (already truncated by the pairing policy);
2. decoding the generated tokens up to the first end-of-sequence token, in Unicode NFC;
3. pairing that text with both tokenizers through `pairing.encode_response_after_prompt` (the code that pairs dataset
   responses), after each side's own prompt tokens from the batch, so offsets, spans, labels and method extras come
   out exactly as for a dataset record; a response that stopped at EOS ends with EOS on both sides, one that hit
   the length limit does not;
4. collating the examples with the run's collator (spans, method extras). The teacher then runs once on it, as on
   any batch, so every cross-tokenizer method works unchanged.

Degenerate generations are dropped from the micro-batch (so they add nothing to the distillation term or the
normalisers) and counted: `eos_only` (the first sampled token ends the answer), `empty` (decodes to whitespace only)
and `no_spans` (the two tokenisations share no cut point, so span methods have nothing to align). A micro-batch
whose generations are ALL degenerate keeps its dataset responses for that step (counted as a fallback), so every
process still runs the same number of forward/backward passes (DDP stays in step).

Which steps are on-policy: evenly spread, step s (0-based) when floor((s + 1) * ratio) > floor(s * ratio), so any
run's first n steps hold floor(n * ratio) of them (0.5: every second step, from the second; below 1 the first step
reads the data). A random draw per step (TRL's GKD) can cluster: at seed 42, ratio 0.5 drew 17 of a real run's 24
steps, 14 of them in a row from the second step, before the student had seen a dozen references. The sampling inside
generation is seeded by (seed, step, process, micro-batch) in a forked RNG. Nothing draws from the training RNG
(dropout) stream, so a run resumed from a checkpoint makes the same choices and samples the same answers as the
uninterrupted run, and `ratio=0` is exactly the off-policy engine.

The student's CE on generated text is off by default (`on_policy.ce_on_generated`), as in GKD: it would train the
student to repeat its own samples. The engine multiplies a micro-batch's CE term by the scale returned here.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sra_distill.config import OnPolicySettings
from sra_distill.data.batch import PairedBatch, PairedExample
from sra_distill.data.pairing import encode_response_after_prompt
from sra_distill.data.spans import batch_span_ids
from sra_distill.errors import ConfigError
from sra_distill.evaluation.generate import generate_new_tokens, generation_config, pad_token_id

DEGENERATE_KINDS = ("eos_only", "empty", "no_spans")
# metrics.jsonl keys this module adds (plots leave them out of the loss panel).
METRIC_KEYS = ("on_policy", "generation_s", "generated_tokens", "degenerate", "on_policy_fallback_batches",
               *(f"degenerate_{kind}" for kind in DEGENERATE_KINDS))


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence: stable across versions and platforms)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


_SAMPLE_STREAM = 0x5A_3B1E  # keeps the sampling seeds apart from other uses of (seed, step)


def is_on_policy_step(step: int, ratio: float) -> bool:
    """Whether optimiser step `step` (0-based) trains on the student's own answers: spread evenly, the same on every
    process and after a resume (module docstring)."""
    return math.floor((step + 1) * ratio) > math.floor(step * ratio)


def sampling_seed(seed: int, step: int, process: int, micro_batch: int) -> int:
    """The seed of one micro-batch's generation: each process samples its own shard differently."""
    return _seed(_SAMPLE_STREAM, seed, step, process, micro_batch)


@dataclass
class Generation:
    """One generated response: the student token ids before the first end token, whether an end token came (else
    the length limit stopped it), and the decoded NFC text."""

    token_ids: list[int]
    finished: bool
    text: str


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = model.generation_config.eos_token_id  # an int, a list of ints or None
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    autocast=None,
) -> list[Generation]:
    """Sample one response per prompt (token ids, no padding) in one left-padded batch with the KV cache.

    The model is put in eval mode for the call (dropout off) and restored; sampling uses a forked RNG seeded with
    `seed`, so the caller's random streams are untouched. temperature 0 = greedy.
    """
    sampling = temperature > 0.0
    config = generation_config(
        model, tokenizer, pad_token_id=pad_token_id(tokenizer), do_sample=sampling, max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=0, use_cache=True,
        **(dict(temperature=temperature, top_p=top_p, top_k=0) if sampling else {}),
    )
    device = model.device
    forked = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
        torch.manual_seed(seed)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            new_tokens = generate_new_tokens(model, prompts, config)
    stops = _stop_ids(model, tokenizer)
    generations = []
    for row in new_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        ids = row if end is None else row[:end]
        text = unicodedata.normalize("NFC", tokenizer.decode(ids, skip_special_tokens=True))
        generations.append(Generation(ids, end is not None, text))
    return generations


def pair_generation(
    student_prompt: list[int],
    teacher_prompt: list[int],
    generation: Generation,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> PairedExample:
    """Both sides' examples for a generated response, after each side's prompt tokens (as for dataset responses)."""
    sides = [
        encode_response_after_prompt(prompt, generation.text, tokenizer, max_length, end_with_eos=generation.finished)[0]
        for prompt, tokenizer in ((student_prompt, student_tokenizer), (teacher_prompt, teacher_tokenizer))
    ]
    return PairedExample(sides[0], sides[1], generation.text)


def degenerate_kind(generation: Generation, n_spans: int) -> str | None:
    """Why a generation cannot be distilled on (one of `DEGENERATE_KINDS`), or None."""
    if generation.finished and not generation.token_ids:
        return "eos_only"
    if not generation.text.strip():
        return "empty"
    if n_spans == 0:
        return "no_spans"
    return None


def _prompts(side, batch_size: int) -> list[list[int]]:
    """Each row's prompt tokens: the batch is right-padded and the prompt starts every row."""
    starts = side.response_start.tolist()
    return [side.input_ids[b, : starts[b]].tolist() for b in range(batch_size)]


class OnPolicyDistiller:
    """Turns the engine's micro-batch groups into on-policy ones on the chosen steps (see the module docstring)."""

    def __init__(self, settings: OnPolicySettings, seed: int, max_length: int,
                 student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                 collator, accelerator):
        self.settings = settings
        self.seed = seed
        self.max_length = max_length
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.collator = collator
        self.accelerator = accelerator

    @classmethod
    def from_config(cls, cfg, student_tokenizer, teacher_tokenizer, collator, accelerator, *,
                    student_fsdp: bool) -> "OnPolicyDistiller | None":
        """None when `on_policy.ratio` is 0 (off); a clear error when the processes cannot generate (settings alone
        are checked in `validation.check_combinations`)."""
        if cfg.on_policy.ratio <= 0.0:
            return None
        if student_fsdp:
            # Every FSDP forward is a collective; processes generating answers of different lengths would hang.
            raise ConfigError("on_policy.ratio > 0 with an FSDP student is not supported (generation with a sharded "
                              "student); use DDP (configs/accelerate/ddp.yaml), with teacher_sharding=fsdp if needed")
        return cls(cfg.on_policy, cfg.seed, cfg.max_length, student_tokenizer, teacher_tokenizer, collator,
                   accelerator)

    def on_policy_batch(self, model, batch: PairedBatch, seed: int) -> tuple[PairedBatch | None, dict]:
        """The on-policy version of one micro-batch (None when every generation is degenerate) and its counts."""
        settings = self.settings
        student_prompts = _prompts(batch.student, batch.batch_size)
        teacher_prompts = _prompts(batch.teacher, batch.batch_size)
        # No point sampling past what the longest room left by a prompt can hold.
        room = self.max_length - min(len(p) for p in student_prompts)
        started = time.perf_counter()
        generations = generate_responses(
            model, self.student_tokenizer, student_prompts, max_new_tokens=max(1, min(settings.max_new_tokens, room)),
            temperature=settings.temperature, top_p=settings.top_p, seed=seed, autocast=self.accelerator.autocast,
        )
        counts = Counter(generation_s=time.perf_counter() - started, generations=len(generations),
                         generated_tokens=sum(len(g.token_ids) for g in generations))
        examples = [
            pair_generation(s, t, g, self.student_tokenizer, self.teacher_tokenizer, self.max_length)
            for s, t, g in zip(student_prompts, teacher_prompts, generations)
        ]
        longest_s = max(len(e.student.input_ids) for e in examples)
        longest_t = max(len(e.teacher.input_ids) for e in examples)
        n_spans = batch_span_ids(examples, longest_s, longest_t)[2].tolist()
        kept = []
        for example, generation, n in zip(examples, generations, n_spans):
            kind = degenerate_kind(generation, n)
            if kind is None:
                kept.append(example)
            else:
                counts[f"degenerate_{kind}"] += 1
        if not kept:
            return None, counts
        return self.collator(kept).to(self.accelerator.device), counts

    def prepare(self, group: list[PairedBatch], step: int, model) -> tuple[list[PairedBatch], list[float] | None, dict]:
        """(micro-batches to train on, CE scale per micro-batch or None for all 1, metrics for the step's row).

        `model`: the unwrapped student. Every process must call this on every step (the metrics are reduced)."""
        if not is_on_policy_step(step, self.settings.ratio):
            return group, None, {"on_policy": False}
        acc = self.accelerator
        out_group, ce_scales, totals = [], [], Counter()
        ce_scale = 1.0 if self.settings.ce_on_generated else 0.0
        for index, batch in enumerate(group):
            seed = sampling_seed(self.seed, step, acc.process_index, index)
            on_policy, counts = self.on_policy_batch(model, batch, seed)
            totals.update(counts)
            if on_policy is None:  # all degenerate: this micro-batch trains on its dataset responses
                totals["fallback"] += 1
                out_group.append(batch)
                ce_scales.append(1.0)
            else:
                out_group.append(on_policy)
                ce_scales.append(ce_scale)
        names = ["generation_s", "generations", "generated_tokens", "fallback",
                 *(f"degenerate_{kind}" for kind in DEGENERATE_KINDS)]
        local = torch.tensor([float(totals[n]) for n in names], dtype=torch.float64, device=acc.device)
        every = acc.gather(local[None]).reshape(-1, len(names)).cpu()  # [processes, names]
        summed = dict(zip(names, every.sum(0).tolist()))
        degenerate = {f"degenerate_{kind}": int(summed[f"degenerate_{kind}"]) for kind in DEGENERATE_KINDS}
        metrics = {
            "on_policy": True,
            "generation_s": float(every[:, 0].max()),  # the slowest process holds the step back
            "generated_tokens": summed["generated_tokens"] / max(1.0, summed["generations"]),
            "degenerate": sum(degenerate.values()),
            **degenerate,
            "on_policy_fallback_batches": int(summed["fallback"]),
        }
        return out_group, ce_scales, metrics

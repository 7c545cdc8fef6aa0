"""Generation speed of the evaluation path (`sra_distill.evaluation.generate.generate`, as `sra evaluate` runs it) against
plain `model.generate` with the same settings, measured interleaved in one run.

Rows (each generates the same left-padded batches of Dolly-test prompts, DSKD protocol: sampling at T=1, top_p 1,
top_k 0, no-repeat-ngram 6, same seed):

* `generate.generate`: our path (batched no-repeat-n-gram processor from `sra_distill.evaluation.ngram`);
* `model.generate`: plain transformers with `no_repeat_ngram_size=6` (its own processor, whatever the installed
  version implements);
* `model.generate + legacy n-gram rule`: the per-row Python dict rule that transformers used before it vectorised
  its processor (mid-2026); versions >=5.0 that this project allows may still run it.

Throughput = generated tokens (up to and including EOS) / wall seconds. The two plain rows are checked to produce
exactly the tokens our path produces (same seed, same batches), so all rows generate the same number of tokens.
A second table times one call of each n-gram processor alone on a (batch, length) of random ids.

    python benchmarks/bench_generate.py --examples 16 --batch-size 16 --max-new-tokens 64 --repeats 2 \
        --output benchmarks/results/generate.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor, set_seed  # noqa: E402

from sra_distill.evaluation.evaluate import load_eval_set  # noqa: E402
from sra_distill.evaluation.generate import (  # noqa: E402
    NO_REPEAT_NGRAM_SIZE,
    encode_prompts,
    generate,
    generation_config,
)
from sra_distill.evaluation.ngram import BatchedNoRepeatNGramProcessor  # noqa: E402
from sra_distill.models.load import load_model  # noqa: E402
from sra_distill.paths import data_root  # noqa: E402


class LegacyNoRepeatNGram(LogitsProcessor):
    """The rule as transformers implemented it until mid-2026: a dict of all n-grams per row, rebuilt every step."""

    def __init__(self, ngram_size: int):
        self.n = ngram_size

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if length + 1 < self.n:
            return scores
        for row, ids in enumerate(input_ids.tolist()):
            followers: dict[tuple, list[int]] = {}
            for gram in zip(*[ids[i:] for i in range(self.n)]):
                followers[gram[:-1]] = followers.get(gram[:-1], []) + [gram[-1]]
            banned = followers.get(tuple(ids[length + 1 - self.n :]), [])
            scores[row, banned] = -float("inf")
        return scores


def count_generated(new_tokens: torch.Tensor, eos_ids: set[int]) -> int:
    """Tokens each row generated, up to and including its first EOS (the rest is padding)."""
    total = 0
    for row in new_tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


def plain_generate(model, tok, prompts, *, seed, batch_size, max_new_tokens, extra_processor=None):
    """`model.generate` on the same batches as `generate.generate` (same order, padding and config), HF's own
    n-gram rule unless `extra_processor` replaces it. Returns (replies in prompt order, generated token count)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = generation_config(
        model, tok, pad_token_id=pad_id, do_sample=True, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, no_repeat_ngram_size=0 if extra_processor else NO_REPEAT_NGRAM_SIZE,
    )
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    set_seed(seed)
    encoded = encode_prompts(tok, prompts, 256)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    replies, n_tokens = [""] * len(encoded), 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=config,
            logits_processor=LogitsProcessorList([extra_processor] if extra_processor else []),
        )
        n_tokens += count_generated(out[:, width:], eos_ids)
        for i, text in zip(chunk, tok.batch_decode(out[:, width:], skip_special_tokens=True)):
            replies[i] = text.strip()
    return replies, n_tokens


def time_processors(batch: int, length: int, vocab: int, repeats: int) -> list[tuple[str, float]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (batch, length), generator=gen)  # 2000 ids: some n-grams repeat
    scores = torch.randn(batch, vocab, generator=gen)
    rows = []
    for name, proc in [
        ("sra_distill.evaluation.ngram (ours)", BatchedNoRepeatNGramProcessor(NO_REPEAT_NGRAM_SIZE)),
        (f"transformers {transformers.__version__} NoRepeatNGramLogitsProcessor",
         NoRepeatNGramLogitsProcessor(NO_REPEAT_NGRAM_SIZE)),
        ("legacy per-row dict rule", LegacyNoRepeatNGram(NO_REPEAT_NGRAM_SIZE)),
    ]:
        proc(ids, scores.clone())
        start = time.perf_counter()
        for _ in range(repeats):
            proc(ids, scores.clone())
        rows.append((name, (time.perf_counter() - start) / repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="fp32", help="auto, fp32 or bf16 (as sra evaluate --dtype)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--examples", type=int, default=16, help="first N Dolly-test prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every row once")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--no-legacy", action="store_true", help="skip the legacy-rule generation row")
    parser.add_argument("--also-dtype", help="add a row: our path with the model loaded in this dtype too "
                        "(e.g. bf16, what `sra evaluate --dtype auto` gives the packaged teacher)")
    parser.add_argument("--output", help="markdown file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, dtype=args.dtype, device="cpu")
    records = load_eval_set("dolly", data_root() / "dolly/valid.jsonl", args.examples)
    prompts = [r.prompt for r in records]
    settings = dict(seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    def ours():
        return generate(model, tok, prompts, **settings), None

    rows = {"evaluate.generate (ours)": ours,
            "model.generate, no_repeat_ngram_size=6": lambda: plain_generate(model, tok, prompts, **settings)}
    if not args.no_legacy:
        rows["model.generate + legacy n-gram rule"] = lambda: plain_generate(
            model, tok, prompts, **settings, extra_processor=LegacyNoRepeatNGram(NO_REPEAT_NGRAM_SIZE))
    if args.also_dtype:
        other_model, _ = load_model(args.model, dtype=args.also_dtype, device="cpu")
        rows[f"model.generate + our n-gram processor, {args.also_dtype} weights"] = lambda: plain_generate(
            other_model, tok, prompts, **settings, extra_processor=BatchedNoRepeatNGramProcessor(NO_REPEAT_NGRAM_SIZE))
    walls: dict[str, list[float]] = {name: [] for name in rows}
    outputs, counts, load = {}, {}, []
    for round_ in range(args.repeats):
        for name, fn in rows.items():  # interleaved: load changes on a shared machine hit every row alike
            start = time.perf_counter()
            replies, count = fn()
            walls[name].append(time.perf_counter() - start)
            load.append(os.getloadavg()[0])
            outputs.setdefault(name, replies)
            if count is not None:
                counts[name] = count
            print(f"round {round_ + 1} {name}: {walls[name][-1]:.1f} s", flush=True)
    ours_name = next(iter(rows))
    # our path returns text only; it generated the tokens of the plain row when their replies agree
    n_tokens = counts["model.generate, no_repeat_ngram_size=6"]
    counts.setdefault(ours_name, n_tokens)
    same = {name: outputs[name] == outputs[ours_name] for name in rows}
    proc_rows = time_processors(args.batch_size, 256 + 256, len(tok), repeats=20)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = ("python benchmarks/bench_generate.py --model {m} --dtype {d} --threads {t} --examples {e} "
               "--batch-size {b} --max-new-tokens {n} --repeats {r}{l}").format(
        m=args.model, d=args.dtype, t=args.threads, e=args.examples, b=args.batch_size, n=args.max_new_tokens,
        r=args.repeats, l=" --no-legacy" if args.no_legacy else "") + (
        f" --also-dtype {args.also_dtype}" if args.also_dtype else "")
    base = min(walls[ours_name])
    lines = [
        f"### {args.model}, {args.dtype}, {args.threads} torch thread(s), {datetime.now():%Y-%m-%d %H:%M}",
        "", f"`{command}`", "",
        f"- {args.examples} Dolly-test prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, seed "
        f"{args.seed}; {n_tokens} tokens generated per run (to EOS); best of {args.repeats} interleaved rounds",
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, commit {commit}; 1-min load average during the runs "
        f"{min(load):.1f}-{max(load):.1f} (shared machine: absolute figures are contended, ratios less so)",
        *([f"- the {args.also_dtype} row samples other tokens (other numerics); its tokens/s counts its own"]
          if args.also_dtype else []),
        "", "| path | best wall (s) | all walls (s) | tokens/s | time / ours | same replies as ours |",
        "|---|---|---|---|---|---|",
    ]
    for name in rows:
        best = min(walls[name])
        lines.append(f"| {name} | {best:.1f} | {', '.join(f'{w:.1f}' for w in walls[name])} | "
                     f"{counts[name] / best:.1f} | {best / base:.2f} | {'yes' if same[name] else 'NO'} |")
    lines += ["", f"One call of each n-gram processor alone, batch {args.batch_size}, 512 ids, vocab {len(tok)} "
              "(mean of 20):", "", "| processor | ms / call |", "|---|---|"]
    lines += [f"| {name} | {sec * 1000:.2f} |" for name, sec in proc_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        path = Path(args.output)
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text((old.rstrip() + "\n\n" if old else "") + text, encoding="utf-8")


if __name__ == "__main__":
    main()

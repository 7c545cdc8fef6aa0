"""Span alignment speed: `sra_distill.data.spans.batch_span_ids` against a plain per-token Python loop.

Workload: 64 sequences of 512 tokens, GPT-2 student vs Llama-2 teacher, each a Dolly prompt followed by Dolly
responses concatenated until both sides pass 512 tokens, then each side truncated to 512 tokens (so the two sides
stop at different characters), encoded as the data pipeline does (`PairedExample`, offsets as an int array per
side, which `pairing.py` builds once per example); the loop reads the same offsets as Python lists.
Goal: the vectorised path >= 10x faster than the loop. Writes benchmarks/results/spans.md.

    python benchmarks/bench_spans.py [--quick]

`reference_align` below is also the independent reference of tests/test_spans.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sra_distill.data.batch import PairedExample, SideExample  # noqa: E402
from sra_distill.data.spans import batch_span_ids, span_ids  # noqa: E402
from sra_distill.data.tokenization import load_tokenizer  # noqa: E402
from sra_distill.paths import data_root  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "spans.md"


def reference_align(s_off, t_off, s_start=0, t_start=0, s_special=None, t_special=None):
    """Spans `(s_begin, s_end, t_begin, t_end)` and per-token span ids (lists) by a plain per-token loop.

    Per side: a forward pass (does the token end at or after every earlier token?) and a backward pass (do all later
    tokens end after its end and start at or after it?) give the cut tokens; a two-pointer merge of the two sorted
    cut-position lists gives the common cuts, hence the spans.
    """

    def kept_tokens(off, start, special):
        if special is None:
            special = [tuple(o) == (0, 0) for o in off]
        return [i for i in range(start, len(off)) if not special[i]]

    def side_cuts(off, kept):
        reaches_furthest, furthest = [], -1
        for i in kept:
            furthest = max(furthest, off[i][1])
            reaches_furthest.append(off[i][1] >= furthest)
        cuts, later_end, later_start = [], float("inf"), float("inf")
        for pos in range(len(kept) - 1, -1, -1):
            start, end = off[kept[pos]]
            if reaches_furthest[pos] and end < later_end and end <= later_start:
                cuts.append((end, pos))
            later_end, later_start = min(later_end, end), min(later_start, start)
        return cuts[::-1]

    s_kept, t_kept = kept_tokens(s_off, s_start, s_special), kept_tokens(t_off, t_start, t_special)
    s_cuts, t_cuts = side_cuts(s_off, s_kept), side_cuts(t_off, t_kept)
    spans, s_ids, t_ids = [], [-1] * len(s_off), [-1] * len(t_off)
    i = j = 0
    s_prev = t_prev = -1  # position (in the kept lists) of the previous common-cut token
    while i < len(s_cuts) and j < len(t_cuts):
        if s_cuts[i][0] == t_cuts[j][0]:
            s_pos, t_pos = s_cuts[i][1], t_cuts[j][1]
            k = len(spans)
            spans.append((s_kept[s_prev + 1], s_kept[s_pos] + 1, t_kept[t_prev + 1], t_kept[t_pos] + 1))
            for p in range(s_prev + 1, s_pos + 1):
                s_ids[s_kept[p]] = k
            for p in range(t_prev + 1, t_pos + 1):
                t_ids[t_kept[p]] = k
            s_prev, t_prev, i, j = s_pos, t_pos, i + 1, j + 1
        elif s_cuts[i][0] < t_cuts[j][0]:
            i += 1
        else:
            j += 1
    return spans, s_ids, t_ids


def reference_batch(examples: list[PairedExample], s_len: int, t_len: int):
    """The loop baseline with the same output as `batch_span_ids`: padded [B, T] tensors and [B] counts."""
    s_rows, t_rows, counts = [], [], []
    for ex in examples:
        s, t = ex.student, ex.teacher
        spans, s_ids, t_ids = reference_align(
            s.offsets, t.offsets, s.response_start, t.response_start, s.special, t.special
        )
        s_rows.append(s_ids + [-1] * (s_len - len(s_ids)))
        t_rows.append(t_ids + [-1] * (t_len - len(t_ids)))
        counts.append(len(spans))
    return torch.tensor(s_rows), torch.tensor(t_rows), torch.tensor(counts)


def encode_side(name: str, prompt: str, response: str, length: int) -> SideExample:
    """Prompt (with the tokenizer's own BOS) then response tokens, truncated to `length` tokens."""
    tok = load_tokenizer(name)
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    n = length - len(p)
    if n <= 0 or len(r["input_ids"]) < n:
        raise ValueError(f"{name}: text too short for {length} tokens")
    offsets = np.zeros((length, 2), dtype=np.int64)  # as pairing.py stores them
    offsets[len(p):] = np.asarray(r["offset_mapping"][:n], dtype=np.int64)
    special = [True] * len(p) + [False] * n
    return SideExample(p + r["input_ids"][:n], offsets, special, [not x for x in special], len(p))


def build_examples(count: int, length: int, student: str, teacher: str) -> list[PairedExample]:
    with open(data_root() / "dolly" / "valid.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    examples, cursor = [], 0
    for i in range(count):
        prompt, parts = records[i]["prompt"], []
        while len(" ".join(parts)) < 8 * length:  # ~2 tokens per 8 characters of slack on both sides
            parts.append(records[cursor % len(records)]["output"])
            cursor += 1
        response = "\n\n".join(parts)
        student_side = encode_side(student, prompt, response, length)
        examples.append(PairedExample(student_side, encode_side(teacher, prompt, response, length), response))
    return examples


def best_times(methods: dict, rounds: int) -> dict[str, float]:
    """Best wall time of each method over `rounds` rounds; every round runs every method once, in rotating order,
    so load from other processes hits all methods alike. Garbage collection is off while timing, as in timeit."""
    best = {name: float("inf") for name in methods}
    names = list(methods)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                methods[name]()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end of the run (other jobs share the CPUs; the interleaved "
        "rounds keep the ratios fair, the absolute times move with the load)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, do not rewrite the results file")
    parser.add_argument("--student", default="gpt2")
    parser.add_argument("--teacher", default="llama2")
    args = parser.parse_args()
    batch, length = 64, 512
    rounds = 5 if args.quick else 100

    examples = build_examples(batch, length, args.student, args.teacher)
    # The plain loop works on plain Python lists; the same examples with list-of-tuple offsets are also timed
    # through batch_span_ids (the cost of reading Python tuples, for users who build offsets themselves).
    as_lists = [
        PairedExample(
            *(dataclasses.replace(side, offsets=[tuple(o) for o in side.offsets.tolist()])
              for side in (ex.student, ex.teacher)),
            ex.response,
        )
        for ex in examples
    ]
    # Same answer first, then speed.
    expected = reference_batch(as_lists, length, length)
    for got in (batch_span_ids(examples, length, length), batch_span_ids(as_lists, length, length)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), "vectorised and loop results differ"
    spans_per_seq = expected[2].float().mean().item()

    def per_sequence():
        for ex in examples:
            s, t = ex.student, ex.teacher
            span_ids(
                s.offsets, t.offsets, s.response_start, t.response_start,
                student_special=s.special, teacher_special=t.special,
            )

    # The loop takes ~10x longer than one batched call, so on a loaded machine it rarely gets a quiet window; timing
    # it in 8 chunks of 8 sequences (each about as long as a batched call) and adding the chunks' best times
    # exposes both sides to the load alike.
    chunk = batch // 8
    loop_chunks = {
        f"loop {i}": (lambda i=i: reference_batch(as_lists[i : i + chunk], length, length))
        for i in range(0, batch, chunk)
    }
    timings = best_times(
        {
            **loop_chunks,
            "batch_span_ids, PairedExample (pipeline arrays)": lambda: batch_span_ids(examples, length, length),
            "batch_span_ids, offsets as lists of tuples": lambda: batch_span_ids(as_lists, length, length),
            "span_ids one sequence at a time": per_sequence,
        },
        rounds,
    )
    timings = {"per-token Python loop (reference)": sum(timings.pop(name) for name in loop_chunks), **timings}
    baseline = timings["per-token Python loop (reference)"]
    rows = [
        f"| {name} | {seconds * 1e3:.2f} | {seconds / batch * 1e6:.0f} | {baseline / seconds:.1f}x |"
        for name, seconds in timings.items()
    ]
    table = "\n".join(
        ["| method | ms per batch | µs per sequence | speed-up vs loop |", "| --- | ---: | ---: | ---: |", *rows]
    )
    speedup = baseline / timings["batch_span_ids, PairedExample (pipeline arrays)"]
    machine = machine_info()
    print(machine)
    print(f"{batch} sequences x {length} tokens, {args.student} vs {args.teacher}, {spans_per_seq:.0f} spans/seq")
    print(table)
    print(f"speed-up of batch_span_ids over the loop (goal >= 10x): {speedup:.1f}x on PairedExample input")
    if args.quick:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Span alignment benchmark\n\n"
        f"`python benchmarks/bench_spans.py` — {batch} sequences x {length} tokens, {args.student} student vs "
        f"{args.teacher} teacher, Dolly prompt + concatenated Dolly responses, each side truncated to {length} tokens; "
        f"{spans_per_seq:.0f} spans per sequence on average. Best of {rounds} interleaved rounds (every method once "
        "per round, garbage collection off while timing; the loop timed in 8 chunks of 8 sequences, best times "
        "added); outputs checked equal before timing.\n\n"
        f"Machine: {machine}.\n\n{table}\n\n"
        f"Speed-up over the per-token loop (goal >= 10x): **{speedup:.1f}x** on `PairedExample` input as the data "
        f"pipeline builds it (offsets as int arrays), "
        f"**{baseline / timings['batch_span_ids, offsets as lists of tuples']:.1f}x** when offsets arrive as lists "
        "of tuples: reading Python tuples (~40 ns a token per side) is then about 40% of the time, which is why "
        "pairing.py stores arrays.\n",
        encoding="utf-8",
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())

"""CPU seconds of SRA's span KL on top of the student's CE (forward + backward), at the step_cost shapes, one thread
(so other processes sharing the core do not count): the span logits from the centres (`fused_span_kl.span_kl`) and
from the token logits in one node with the CE (`logit_losses.ce_and_span_kl`, the engine's path). Also the student
CE step's head work for scale (the floor pays it anyway), and the plain `F.cross_entropy` for comparison.

    python benchmarks/span_kl_profile.py [--layout batch] [--threads 1] [--student-dim 256] [--repeats 3]

Layouts: `batch` (default) is the demo's 8x128 batch as the data pipeline lays it out: each sample a prompt, then
its response in spans of consecutive tokens (every 40th span two tokens: 8 x 80 spans over 8 x 82 tokens; the demo's
real batch has 647 spans over 661 tokens); `scattered` is --spans one-token spans at random rows of --tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from sra_distill.losses.fused_span_kl import SharedHead, span_kl
from sra_distill.losses.logit_losses import SpanTokens, causal_lm_ce, ce_and_span_kl


def cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("batch", "scattered"), default="batch")
    parser.add_argument("--batch-size", type=int, default=8, help="batch layout: samples")
    parser.add_argument("--seq-len", type=int, default=128, help="batch layout: tokens per sample")
    parser.add_argument("--response", type=int, default=82, help="batch layout: response tokens per sample")
    parser.add_argument("--spans", type=int, default=700, help="scattered layout: one-token spans")
    parser.add_argument("--tokens", type=int, default=1024, help="scattered layout: B x T student tokens")
    parser.add_argument("--student-dim", type=int, default=256)
    parser.add_argument("--teacher-dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--teacher-vocab", type=int, default=49152)
    parser.add_argument("--shared", type=int, default=36961)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    if args.layout == "batch":
        args.tokens = args.batch_size * args.seq_len
        positions, spans = [], []
        for sample in range(args.batch_size):
            start = sample * args.seq_len + args.seq_len - args.response
            for offset in range(args.response):
                positions.append(start + offset)
                # every 40th span two tokens: the second token joins the span before it
                spans.append(spans[-1] if offset and offset % 41 == 40 else (spans[-1] + 1 if spans else 0))
        positions, spans = torch.tensor(positions), torch.tensor(spans)
    else:
        positions = torch.randperm(args.tokens, generator=gen)[: args.spans].sort().values
        spans = torch.arange(args.spans)
    num_spans = int(spans[-1]) + 1
    hidden = torch.randn(1, args.tokens, args.student_dim, generator=gen).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.student_dim, generator=gen) * 0.05).requires_grad_(True)
    rows = torch.randperm(args.vocab, generator=gen)[: args.shared].sort().values
    t_states = torch.randn(num_spans, args.teacher_dim, generator=gen)
    t_weight = (torch.randn(args.teacher_vocab, args.teacher_dim, generator=gen) * 0.05).bfloat16()
    t_rows = torch.randperm(args.teacher_vocab, generator=gen)[: args.shared].sort().values
    labels = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=gen)  # row t predicts labels[t + 1]
    tokens = SpanTokens(positions, spans, torch.ones(positions.shape[0]), num_spans)

    def plain_ce():
        logits = hidden @ weight.T
        torch.nn.functional.cross_entropy(logits[0], labels[0, 1:]).backward()

    def ce_only():
        logits = torch.nn.functional.pad(hidden @ weight.T, (0, 0, 0, 1))  # T + 1 rows, the last one unlabelled
        causal_lm_ce(logits, labels).backward()

    student_head = SharedHead(weight, None, rows)
    teacher_head = SharedHead(t_weight, None, t_rows)

    def ce_and_kl(from_tokens: bool):
        logits = torch.nn.functional.pad(hidden @ weight.T, (0, 0, 0, 1))
        if from_tokens:
            ce, kl = ce_and_span_kl(logits, labels, tokens, rows, t_states, teacher_head, 2.0, 8)
        else:
            ce = causal_lm_ce(logits, labels)
            centres = torch.zeros(num_spans, args.student_dim).index_add(0, spans, hidden[0][positions])
            kl = span_kl(centres, student_head, t_states, teacher_head, 2.0, 8)
        (ce + kl).backward()

    base = cpu_seconds(ce_only, args.repeats)
    print(f"shapes ({args.layout}): {num_spans} spans over {positions.shape[0]} of {args.tokens} tokens, d_S "
          f"{args.student_dim}, d_T {args.teacher_dim}, V {args.vocab}, V_T {args.teacher_vocab}, shared {args.shared}; "
          f"CPU seconds, {args.threads} thread(s), best of {args.repeats}")
    print(f"  student head + F.cross_entropy fwd/bwd:     {cpu_seconds(plain_ce, args.repeats):.3f} s")
    print(f"  student head + CE fwd/bwd (in the floor):   {base:.3f} s")
    for name, fn in (("from the centres", lambda: ce_and_kl(False)), ("from token logits", lambda: ce_and_kl(True))):
        total = cpu_seconds(fn, args.repeats)
        print(f"  + span KL, {name:18s} {total:.3f} s  (span KL adds {total - base:.3f} s)")


if __name__ == "__main__":
    main()

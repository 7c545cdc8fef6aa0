"""CPU seconds of SRA's span KL on top of the student's CE (forward + backward), at the step_cost shapes, one thread
(so other processes sharing the core do not count): the span logits from the centres (`fused_span_kl.span_kl`) and
from the token logits in one node with the CE (`logit_losses.ce_and_span_kl`, the engine's path). Also the student
CE step's head work for scale (the floor pays it anyway), and the plain `F.cross_entropy` for comparison.

    python benchmarks/span_kl_profile.py [--spans 700] [--tokens 1024] [--student-dim 256] [--repeats 3]
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
    parser.add_argument("--spans", type=int, default=700, help="valid one-token spans (8x128 batch: ~700)")
    parser.add_argument("--tokens", type=int, default=1024, help="B x T student tokens")
    parser.add_argument("--student-dim", type=int, default=256)
    parser.add_argument("--teacher-dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--shared", type=int, default=36961)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.student_dim, generator=gen).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.student_dim, generator=gen) * 0.05).requires_grad_(True)
    rows = torch.randperm(args.vocab, generator=gen)[: args.shared].sort().values
    positions = torch.randperm(args.tokens, generator=gen)[: args.spans].sort().values
    t_states = torch.randn(args.spans, args.teacher_dim, generator=gen)
    t_weight = (torch.randn(args.shared, args.teacher_dim, generator=gen) * 0.05).bfloat16()
    labels = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=gen)  # row t predicts labels[t + 1]
    tokens = SpanTokens(positions, torch.arange(args.spans), torch.ones(args.spans), args.spans)

    def plain_ce():
        logits = hidden @ weight.T
        torch.nn.functional.cross_entropy(logits[0], labels[0, 1:]).backward()

    def ce_only():
        logits = torch.nn.functional.pad(hidden @ weight.T, (0, 0, 0, 1))  # T + 1 rows, the last one unlabelled
        causal_lm_ce(logits, labels).backward()

    student_head = SharedHead(weight, None, rows)
    teacher_head = SharedHead(t_weight, None, torch.arange(args.shared))

    def ce_and_kl(from_tokens: bool):
        logits = torch.nn.functional.pad(hidden @ weight.T, (0, 0, 0, 1))
        if from_tokens:
            ce, kl = ce_and_span_kl(logits, labels, tokens, rows, t_states, teacher_head, 2.0, 8)
        else:
            ce = causal_lm_ce(logits, labels)
            kl = span_kl(hidden[0][positions], student_head, t_states, teacher_head, 2.0, 8)
        (ce + kl).backward()

    base = cpu_seconds(ce_only, args.repeats)
    print(f"shapes: {args.spans} spans, {args.tokens} tokens, d_S {args.student_dim}, d_T {args.teacher_dim}, "
          f"V {args.vocab}, shared {args.shared}; CPU seconds, 1 thread, best of {args.repeats}")
    print(f"  student head + F.cross_entropy fwd/bwd:     {cpu_seconds(plain_ce, args.repeats):.3f} s")
    print(f"  student head + CE fwd/bwd (in the floor):   {base:.3f} s")
    for name, fn in (("from the centres", lambda: ce_and_kl(False)), ("from token logits", lambda: ce_and_kl(True))):
        total = cpu_seconds(fn, args.repeats)
        print(f"  + span KL, {name:18s} {total:.3f} s  (span KL adds {total - base:.3f} s)")


if __name__ == "__main__":
    main()

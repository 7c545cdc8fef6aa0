"""The engine's span KL (`logit_losses.ce_and_span_kl`, with the student's CE) of this tree against another git
revision's, on the demo's real 8x128 batch (`step_cost.py --quick`'s: SmolLM2 teacher in bf16, the toy GPT-2-vocabulary
student), interleaved in one process: values (and the KL's in float64 from the same inputs), the gradient's largest
difference, and the median wall and CPU time of the KL's part (CE + KL minus the CE alone, forward and backward) over
the repeats.

    python benchmarks/span_kl_ab.py --against HEAD~1 [--threads 1] [--repeats 9] [--teacher-precision fp32]

The batch's arguments are taken from one real SRA step of `step_cost.py`'s demo rows (models built offline, random
student weights, seed 0), so the spans, pooling weights and shared ids are the data pipeline's, not synthetic ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODULE = "src/sra_distill/losses/logit_losses.py"


def real_batch_arguments() -> dict:
    """ce_and_span_kl's arguments in one SRA step of step_cost's demo setting (8x128)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_cost

    import sra_distill.losses.sra as sra_module
    from sra_distill.config import load_config
    from sra_distill.train.methods import build_method

    setting = step_cost.Setting(seq_len=128, batch_size=8)
    cfg = load_config(None, setting.overrides("sra"))
    teacher, teacher_tok, student, student_tok = step_cost.load_models(cfg, setting, torch.device("cpu"))
    teacher.eval().requires_grad_(False)
    method, _ = build_method(cfg, student, teacher, student_tok, teacher_tok)
    batch, _ = step_cost.build_batch(setting, method, student_tok, teacher_tok)
    optimizer = torch.optim.AdamW([*student.parameters(), *method.parameters()], lr=0.0)
    step = step_cost.make_step("sra", cfg, method, student, teacher, optimizer, batch)
    seen: dict = {}
    real = sra_module.ce_and_span_kl

    def keep(logits, labels, tokens, student_rows, teacher_centres, teacher_head, temperature, divisor, **options):
        seen.update(logits=logits.detach().clone(), labels=labels, tokens=tokens, student_rows=student_rows,
                    teacher_centres=teacher_centres.detach(), teacher_head=teacher_head, temperature=temperature,
                    divisor=divisor)
        return real(logits, labels, tokens, student_rows, teacher_centres, teacher_head, temperature, divisor,
                    **options)

    sra_module.ce_and_span_kl = keep
    try:
        step()
    finally:
        sra_module.ce_and_span_kl = real
    return seen


def exact_kl(a: dict) -> float:
    """L_kl in float64 from the same inputs: the teacher's centres rounded to its head's dtype and multiplied by its
    shared head rows exactly (no rounding of the product), the student's span logits pooled from its token logits."""
    tokens, head = a["tokens"], a["teacher_head"]
    rows = head.rows.to(head.weight.device)
    z_t = a["teacher_centres"].to(head.weight.dtype).double() @ head.weight[rows].double().T
    if head.bias is not None:
        z_t += head.bias[rows].double()
    flat = a["logits"].reshape(-1, a["logits"].shape[-1])
    picked = flat[tokens.positions][:, a["student_rows"]].double() * tokens.weights.double()[:, None]
    z_s = torch.zeros(tokens.num_spans, picked.shape[1], dtype=torch.float64).index_add_(0, tokens.spans, picked)
    log_p, log_q = (torch.log_softmax(z / a["temperature"], -1) for z in (z_t, z_s))
    return float((log_p.exp() * (log_p - log_q)).sum() / a["divisor"])


def module_at(revision: str):
    """logit_losses.py as it was at `revision`, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:{MODULE}"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    with tempfile.TemporaryDirectory() as folder:  # only read while the module executes
        path = Path(folder) / "logit_losses_then.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("logit_losses_then", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose logit_losses.py is compared")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--teacher-precision", choices=("bf16", "fp32"), default="bf16",
                        help="the teacher's head and centres in this dtype (fp32: as the shipped CPU configs run it)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    torch.set_num_threads(args.threads)
    import sra_distill.losses.logit_losses as now

    then = module_at(args.against)
    a = real_batch_arguments()
    if args.teacher_precision == "fp32":
        head = a["teacher_head"]
        a["teacher_head"] = dataclasses.replace(head, weight=head.weight.float(),
                                                bias=None if head.bias is None else head.bias.float())
        a["teacher_centres"] = a["teacher_centres"].float()
    tokens = a["tokens"]

    def run(module, with_kl: bool = True):
        logits = a["logits"].clone().requires_grad_(True)
        if with_kl:
            spans = module.SpanTokens(tokens.positions, tokens.spans, tokens.weights, tokens.num_spans)
            ce, kl = module.ce_and_span_kl(logits, a["labels"], spans, a["student_rows"], a["teacher_centres"],
                                           a["teacher_head"], a["temperature"], a["divisor"])
        else:
            ce, kl = module.causal_lm_ce(logits, a["labels"]), torch.zeros(())
        (ce + 0.7 * kl).backward()
        return kl.detach(), logits.grad

    (kl_then, grad_then), (kl_now, grad_now) = run(then), run(now)
    print(f"{tokens.num_spans} spans over {tokens.positions.shape[0]} tokens; KL {args.against} {kl_then.item():.6f}, "
          f"this tree {kl_now.item():.6f}, float64 {exact_kl(a):.6f}; largest gradient difference "
          f"{(grad_then - grad_now).abs().max().item():.2e}"
          f" (largest gradient {grad_then.abs().max().item():.2e})")
    times: dict[str, list[tuple[float, float]]] = {"ce": [], "then": [], "now": []}
    for _ in range(args.repeats):
        for name, fn in (("ce", lambda: run(now, False)), ("then", lambda: run(then)), ("now", lambda: run(now))):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    ce_wall, ce_cpu = (statistics.median(t[i] for t in times["ce"]) for i in (0, 1))
    print(f"{args.threads} thread(s), median of {args.repeats}, CE alone {ce_wall * 1e3:.0f} ms wall")
    for name, label in (("then", args.against), ("now", "this tree")):
        wall, cpu = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        print(f"  span KL's part, {label:12s} {(wall - ce_wall) * 1e3:6.1f} ms wall, {(cpu - ce_cpu) * 1e3:6.1f} ms CPU")


if __name__ == "__main__":
    main()

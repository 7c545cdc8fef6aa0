"""Checks of the code that behaves differently on an accelerator, runnable on any device without pytest.

    python benchmarks/device_checks.py [--device cuda]     # what benchmarks/gpu_check.sh runs first

1. lean attention rows: `capture`'s last-query row ("sra_lean" attention) against eager attention maps, per family
   (GPT-2, Llama with grouped-query heads, Qwen2 with q/k/v biases), in float32 and bfloat16 on the device;
2. SRA's span KL on the device in bf16 (bf16 teacher head, student under bf16 autocast), from the centres and from
   the student's token logits, against the plain span KL in float64 on the CPU, values and gradients;
3. one distillation step of the packaged tiny config through `engine.Trainer` with precision=bf16 on the device: finite
   loss and gradients, the update applied, SRA's span KL taken from the student's token logits.

Each check raises AssertionError with the numbers when it fails; `tests/test_device_check.py` runs them on the CPU.
Needs only torch, transformers, accelerate and peft (and the data root's tokenizers/ and dolly/ for check 3).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from sra_distill.models.capture import capture

REPO = Path(__file__).resolve().parents[1]


def _tiny_models(dtype, device):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    small = dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=300)
    made = {
        "gpt2": GPT2LMHeadModel._from_config(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                                        vocab_size=300), attn_implementation="eager", dtype=dtype),
        "llama-gqa": LlamaForCausalLM._from_config(LlamaConfig(num_key_value_heads=2, **small),
                                                   attn_implementation="eager", dtype=dtype),
        "qwen2": Qwen2ForCausalLM._from_config(Qwen2Config(num_key_value_heads=4, **small),
                                               attn_implementation="eager", dtype=dtype),
    }
    return {name: model.to(device).eval() for name, model in made.items()}


def check_lean_attention_rows(device: str) -> list[str]:
    """Rows of every block for a right- and a left-padded batch equal the eager maps' rows (summed over heads)."""
    report = []
    lengths = torch.tensor([48, 17, 33])
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for name, model in _tiny_models(dtype, device).items():
            for side in ("right", "left"):
                gen = torch.Generator().manual_seed(1)
                input_ids = torch.randint(0, 300, (3, 48), generator=gen)
                positions = torch.arange(48)
                mask = positions < lengths[:, None] if side == "right" else positions >= 48 - lengths[:, None]
                input_ids, mask = input_ids.to(device), mask.long().to(device)
                with torch.no_grad():
                    eager = model(input_ids=input_ids, attention_mask=mask, use_cache=False, output_attentions=True)
                    view = capture(model, input_ids, mask, attention_layers=(0, 1, 2), logits=False)
                last = (mask.shape[1] - 1 - mask.flip(1).argmax(1)).tolist()
                worst = 0.0
                for layer in range(3):
                    expected = torch.stack([eager.attentions[layer][b, :, last[b]].float().sum(0) for b in range(3)])
                    worst = max(worst, float((view.attention_row[layer] - expected).abs().max()))
                assert worst <= atol, f"lean row vs eager, {name} {dtype} {side}-padded: max |diff| {worst:.3g} > {atol}"
                report.append(f"lean row {name:9s} {str(dtype):14s} {side:5s}: max |diff| {worst:.2e} (tol {atol})")
    return report


def check_span_kl_bf16(device: str) -> list[str]:
    """The span KL on the device in bf16, from the centres and from the token logits, against the plain span KL
    (each head applied to the centres, autograd) in float64 on the CPU."""
    from sra_distill.losses.fused_span_kl import SharedHead, span_kl
    from sra_distill.losses.logit_losses import SpanTokens, ce_and_span_kl

    gen = torch.Generator().manual_seed(2)
    spans, d_s, d_t, vocab, shared, tau, batch = 700, 96, 160, 3000, 2000, 2.0, 4
    hidden = torch.randn(spans, d_s, generator=gen)  # one token per span: the centres are the tokens themselves
    weight = torch.randn(vocab, d_s, generator=gen) * 0.1
    teacher_states = torch.randn(spans, d_t, generator=gen)
    teacher_weight = (torch.randn(shared, d_t, generator=gen) * 0.1).bfloat16()
    rows = torch.randperm(vocab, generator=gen)[:shared]

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    student64 = (h64 @ w64[rows].T) / tau
    teacher64 = (teacher_states.double() @ teacher_weight.double().T) / tau
    expected = torch.nn.functional.kl_div(student64.log_softmax(-1), teacher64.log_softmax(-1), log_target=True,
                                          reduction="sum") / batch
    expected_grads = torch.autograd.grad(expected, (h64, w64))

    report = []
    for form in ("centres", "tokens"):
        h = hidden.to(device).requires_grad_(True)
        w = weight.to(device).requires_grad_(True)
        t_states, dev_rows = teacher_states.to(device), rows.to(device)
        teacher_head = SharedHead(teacher_weight.to(device), None, torch.arange(shared, device=device))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            if form == "tokens":  # the engine's path: in one node with the CE (no labels here, so only the KL)
                identity = torch.arange(spans, device=device)
                logits = (h @ w.T)[None]  # bf16 under autocast, as a bf16 student's token logits
                tokens = SpanTokens(identity, identity, torch.ones(spans, device=device), spans)
                labels = torch.full((1, spans), -100, device=device)
                _, value = ce_and_span_kl(logits, labels, tokens, dev_rows, t_states, teacher_head, tau, batch)
            else:
                value = span_kl(h, SharedHead(w, None, dev_rows), t_states, teacher_head, tau, batch)
        grads = torch.autograd.grad(value, (h, w))
        rel_value = abs(float(value.detach()) - float(expected.detach())) / abs(float(expected.detach()))
        assert value.dtype == torch.float32 and rel_value < 3e-2, f"{form} span KL bf16: relative error {rel_value:.3g}"
        for name, got, want in zip(("states", "head"), grads, expected_grads):
            got = got.double().cpu()
            rel = float((got - want).norm() / want.norm())
            assert torch.isfinite(got).all() and rel < 5e-2, f"{form} span KL bf16, {name} gradient: relative error {rel:.3g}"
            report.append(f"span KL {form:7s} bf16 on {device}: value rel err {rel_value:.1e}, {name} grad rel err {rel:.1e}")
    return report


def check_distill_step_bf16(device: str) -> list[str]:
    """One optimiser step of the tiny config with precision=bf16 on the device, span KL from the token logits."""
    from accelerate import Accelerator

    import sra_distill.losses.sra as sra_module
    from sra_distill.config import load_config
    from sra_distill.paths import resolve_config
    from sra_distill.train.engine import Trainer

    calls = []
    original = sra_module.ce_and_span_kl

    def counting(logits, *args, **kwargs):
        calls.append(logits.dtype)
        return original(logits, *args, **kwargs)

    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a process that made an Accelerator before (a test session) must
    # drop it to ask for bf16, and this check leaves none behind for whatever runs next.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(resolve_config("tiny"), [f"output_dir={out}", "precision=bf16", "max_steps=1"])
            accelerator = Accelerator(mixed_precision="bf16", cpu=torch.device(device).type == "cpu",
                                      step_scheduler_with_optimizer=False)
            trainer = Trainer(cfg, accelerator)
            assert trainer.accelerator.device.type == torch.device(device).type, trainer.accelerator.device
            before = [p.detach().clone() for p in trainer.student.parameters()]
            sra_module.ce_and_span_kl = counting
            try:
                metrics = trainer.train_step(next(trainer._micro_batches()))
            finally:
                sra_module.ce_and_span_kl = original
            moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not metrics["skipped"], f"bf16 distill step skipped: {metrics}"
    for key in ("loss", "ce", "kl", "cos", "geo", "grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), f"bf16 distill step: {key} = {metrics[key]}"
    assert metrics["kl"] > 0 and moved > 0, metrics
    assert calls, "the span KL did not reuse the student's token logits under precision=bf16"
    return [f"distill step bf16 on {device}: loss {metrics['loss']:.4f}, kl {metrics['kl']:.4f}, grad norm "
            f"{metrics['grad_norm']:.3f}, {moved} parameter tensors updated, span KL from {calls[0]} token logits"]


CHECKS = {"lean_rows": check_lean_attention_rows, "span_kl_bf16": check_span_kl_bf16,
          "distill_step_bf16": check_distill_step_bf16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(CHECKS)}")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    failures = 0
    for name in (args.only.split(",") if args.only else CHECKS):
        started = time.perf_counter()
        try:
            lines = CHECKS[name](args.device)
        except AssertionError as error:
            failures += 1
            print(f"FAIL {name} ({time.perf_counter() - started:.1f} s): {error}", flush=True)
            continue
        print(f"PASS {name} ({time.perf_counter() - started:.1f} s)", flush=True)
        for line in lines:
            print(f"     {line}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

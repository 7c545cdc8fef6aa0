"""Step cost: what one distillation training step costs, per method, against the cost no distillation avoids.

Same teacher, student and batch for every row; each row runs in a fresh subprocess (so peak memory is its own):
teacher SmolLM2-135M-Instruct in bf16 (the packaged GGUF, converted once and cached), a random 4-layer GPT-2
student (hidden 256, GPT-2 tokenizer), a batch of 8 real Dolly records, each a prompt followed by consecutive Dolly
responses packed until both sides exceed the length, then truncated to it by `PairedDataset` (so T = 256 on both
sides by default). One measured step = what `engine.Trainer` does per micro-batch: teacher capture under no_grad,
student capture, CE + the method's loss (`methods.build_method` on a `config.load_config` tree), backward,
gradient clipping, one AdamW step.

Rows:
  floor      teacher forward (base model, nothing captured) + student CE step: the cost no distillation avoids
  sra        SRA through `capture`: final hidden states + the last token's attention row ("sra_lean" attention)
  sra_eager  SRA with both models under attn_implementation="eager" and output_attentions=True (every layer's
             [B, H, T, T] maps), token masses taken from the maps by `token_mass`; the rest as `sra`
  sra_authors  the authors' way, all of it: eager maps on every layer of both models, the teacher's full token
             logits (its LM head over the whole sequence and vocabulary), and the plain unchunked span KL (each head
             applied to the centres, rows picked per step, [spans, V_shared] float32 tensors and their gradients;
             written out in `authors_way_distill`)
  sft, uld, mined, dskd, multilevel_ot   the baselines, through `capture` as the engine runs them
  sra_cached, mined_cached, uld_cached   the method with its teacher view read from a teacher cache
             (`train/teacher_cache.py`, the teacher's precision) instead of a teacher forward: the row's process never
             loads the teacher, only its head; the cache of the row's batch is written first by its own subprocess,
             which also times the build against a bare teacher forward and reports the bytes per response token
  sra_no_kl  diagnostic: SRA without its span KL (L_cos + L_geo only), to separate the capture's cost from the
             span-logit term's [spans x shared vocabulary] tensors

Measured per row: median step time after warm-up; peak resident memory of the process (ru_maxrss / VmHWM), the
RSS right after models, method, optimiser and batch are loaded, and the peak increase over it during the steps
(VmHWM reset through /proc/self/clear_refs after loading), so the training step's own cost is visible. On CUDA,
peak allocated memory (torch.cuda.max_memory_allocated) plays the part of RSS.
Goals (ratios from one run): sra peak <= 1.05x floor; sra step <= 1.15x floor with the toy student (hidden 256),
<= 1.05x with a GPT-2-small-size student (hidden >= 768); sra_eager peak >= 1.15x sra; sra_cached step time and
peak <= 1.10x sft; every cached row's step below floor's; with --models paper (teacher ~15x the student) sra_cached
at least 3x faster per step than sra. With `--threads 1` the time
goal reads CPU seconds per step (the row's own work even when other processes share the core), else wall time.
Peak memory on the CPU is the process's resident high-water mark, which also counts what glibc's heap keeps of
freed temporaries; `--mmap-threshold 1048576` returns every allocation above 1 MiB to the system when freed, so
the figure follows the live tensors (both rows of a ratio run the same way; the JSON records which).

Models (`--models`): `demo` = the above; `paper` = the paper's cost setting with random weights: a
Qwen1.5-1.8B-shaped teacher (Qwen2 architecture, bf16) and a GPT-2 120M student (student forward under bf16
autocast on CUDA, as `precision: bf16` runs it), 8x512, rows floor/sra/sra_authors/uld/dskd/mined, printed next to the
paper's cost table; `paper-tiny` = the same code path with tiny shapes (CI smoke run of `gpu_check.sh`).
Weights are random, so no model files are read: only tokenizers and training text from the data root.

    python benchmarks/step_cost.py --quick         # 8x128, floor/sra/sra_eager: ~45 s on 2 idle cores
    python benchmarks/step_cost.py [--seq-len 512] [--rows floor,sra] [--steps N] [--rounds 2] [--json FILE]
    python benchmarks/step_cost.py --models paper --device cuda    # what benchmarks/gpu_check.sh runs
    python benchmarks/step_cost.py --quick --rows floor,sft,sra,sra_cached,mined,mined_cached,uld,uld_cached
    python benchmarks/step_cost.py --models paper --device cpu --threads 1 --teacher-precision fp32 \
        --student-precision fp32 --batch-size 2 --seq-len 128 --rows floor,sft,sra,sra_cached   # CPU, ~10 min
    python benchmarks/step_cost.py --quick --rows sra --profile 12     # + the costliest ops of one more step

Results and analysis: benchmarks/results/step_cost.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sra_distill.config import load_config, method_settings  # noqa: E402
from sra_distill.data.batch import IGNORE_INDEX, ModelView, next_token_targets  # noqa: E402
from sra_distill.data.collate import PairedCollator, PairedDataset  # noqa: E402
from sra_distill.data.records import load_records  # noqa: E402
from sra_distill.data.tokenization import load_tokenizer  # noqa: E402
from sra_distill.losses.logit_losses import causal_lm_ce  # noqa: E402
from sra_distill.losses.sra import span_centers, sra_loss, token_mass  # noqa: E402
from sra_distill.models.capture import capture  # noqa: E402
from sra_distill.models.load import load_model  # noqa: E402
from sra_distill.train.methods import build_method  # noqa: E402
from sra_distill.train.teacher_cache import (  # noqa: E402
    Layout,
    TeacherCache,
    finish_cache,
    logits_from_head,
    teacher_tokenizer_of,
    write_shard,
)

ROWS = ("floor", "sra", "sra_eager", "sra_authors", "sft", "uld", "mined", "dskd", "multilevel_ot", "sra_no_kl",
        "sra_fused", "sra_cached", "mined_cached", "uld_cached")
CACHED_ROWS = tuple(row for row in ROWS if row.endswith("_cached"))
QUICK_ROWS = ("floor", "sra", "sra_eager")
PAPER_ROWS = ("floor", "sra", "sra_authors", "uld", "dskd", "mined", "sra_cached", "uld_cached", "mined_cached")
MODELS = ("demo", "paper", "paper-tiny")
# The method each row builds with `methods.build_method` (floor builds none), and its extra config overrides.
METHOD_OF_ROW = {row: row for row in ROWS} | {
    "floor": None, "sra_eager": "sra", "sra_authors": "sra", "sra_no_kl": "sra", "sra_fused": "sra",
    "sra_cached": "sra", "mined_cached": "mined", "uld_cached": "uld",
}
# Diagnostic: sra_fused = the span KL's student logits always from the head applied to the centres (no reuse of the
# student's token logits).
ROW_OVERRIDES = {"sra_no_kl": ["methods.sra.use_kl=false"], "sra_fused": ["methods.sra.reuse_student_logits=false"]}
# The paper's cost table (Qwen1.5-1.8B -> GPT-2 120M): seconds per step and peak GB where it gives them.
PAPER_COST = {"sra": (0.275, 21.96), "uld": (0.439, 19.63), "mined": (0.424, None), "dskd": (0.352, None)}


def goals_for(setting: "Setting") -> tuple:
    """(description, row, metric, reference row, bound, "<=" or ">=") for this setting."""
    time_bound = 1.05 if setting.student_hidden >= 768 else 1.15
    # With one thread a row's CPU seconds are its own work, whatever else shares the core; wall time is not.
    time_metric, time_name = ("step_cpu_s", "CPU time") if setting.threads == 1 else ("step_s", "time")
    cached = (
        (f"sra_cached step {time_name} <= 1.10x sft", "sra_cached", time_metric, "sft", 1.10, "<="),
        ("sra_cached peak memory <= 1.10x sft", "sra_cached", "peak_mb", "sft", 1.10, "<="),
        *((f"{row} step {time_name} < floor", row, time_metric, "floor", 1.0, "<=") for row in CACHED_ROWS),
    )
    if setting.models != "demo":  # the scaled pair: the teacher's forward is most of a live step
        cached += ((f"sra_cached step {time_name} <= 1/3 of sra", "sra_cached", time_metric, "sra", 1 / 3, "<="),)
    return (
        ("sra peak memory <= 1.05x floor", "sra", "peak_mb", "floor", 1.05, "<="),
        (f"sra step {time_name} <= {time_bound:.2f}x floor", "sra", time_metric, "floor", time_bound, "<="),
        ("sra_eager peak memory >= 1.15x sra", "sra_eager", "peak_mb", "sra", 1.15, ">="),
        *cached,
    )


@dataclasses.dataclass(frozen=True)
class Setting:
    seq_len: int = 256
    batch_size: int = 8
    warmup: int = 1
    steps: int = 4
    student_hidden: int = 256
    student_layers: int = 4
    device: str = "cpu"
    models: str = "demo"
    student_bf16: bool = False  # student forward under bf16 autocast (accelerate's precision: bf16)
    # The teacher's dtype (and its caches'): bf16 as on GPUs and in every figure before; fp32 on a CPU without native
    # bf16, where a bf16 forward is several times slower and would flatter every cached row.
    teacher_bf16: bool = True
    threads: int | None = None  # torch CPU threads per row (None: torch's default)
    # glibc's MALLOC_MMAP_THRESHOLD_ for the rows (None: glibc's default, a dynamic threshold up to 32 MB). Set, every
    # allocation above it is mapped on its own and returned when freed, so the peak follows the live tensors rather
    # than what glibc's heap keeps of freed temporaries.
    mmap_threshold: int | None = None
    cache_root: str | None = None  # where the cached rows' teacher caches are written (one folder per method)
    profile: int = 0  # after the measured steps, one more under torch.profiler: its top ops by self CPU time

    def overrides(self, row: str) -> list[str]:
        return [*ROW_OVERRIDES.get(row, ()),
            f"method={METHOD_OF_ROW[row] or 'sft'}",
            # Pinned rather than the built-in defaults (those moved to a pretrained Llama-2-vocabulary student and
            # an fp32 teacher): the toy student and bf16 teacher this benchmark's figures were always measured with.
            "student=random:gpt2", "student_tokenizer=gpt2",
            f"teacher_precision={'bf16' if self.teacher_bf16 else 'fp32'}",
            f"max_length={self.seq_len}",
            f"max_prompt_length={self.seq_len // 2}",
            f"batch_size={self.batch_size}",
            f"student_arch.hidden_size={self.student_hidden}",
            f"student_arch.num_layers={self.student_layers}",
            f"student_arch.num_heads={max(1, self.student_hidden // 64)}",
            f"student_arch.max_positions={max(1024, self.seq_len)}",
        ]


# ---------------------------------------------------------------------------------------------------------------
# Memory readings (Linux). VmHWM is the resident high-water mark; writing "5" to clear_refs resets it to the
# current RSS, which is how the peak of the steps alone is isolated from the peak of loading.


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line (this benchmark reads Linux memory counters)")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class MemoryMeter:
    """Process peak, memory after loading, and peak during the steps, in MB (RSS on CPU, allocated on CUDA)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark_loaded(self) -> None:
        self.load_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        self.loaded_rss_kb = _status_kb("VmRSS")
        _reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            self.loaded_cuda = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict:
        step_peak_kb = _status_kb("VmHWM")
        rss = {
            "rss_peak_mb": max(self.load_peak_kb, step_peak_kb) / 1024,
            "rss_loaded_mb": self.loaded_rss_kb / 1024,
            "rss_step_increase_mb": (step_peak_kb - self.loaded_rss_kb) / 1024,
        }
        if not self.cuda:
            return {"peak_mb": rss["rss_peak_mb"], "loaded_mb": rss["rss_loaded_mb"],
                    "step_increase_mb": rss["rss_step_increase_mb"], **rss}
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "loaded_mb": self.loaded_cuda / 2**20,
                "step_increase_mb": (peak - self.loaded_cuda) / 2**20, **rss}


# ---------------------------------------------------------------------------------------------------------------
# The batch: real Dolly text, packed so that every example fills the sequence length on both sides.


def packed_records(count: int, seq_len: int) -> list:
    """`count` Dolly train records, each with consecutive responses appended (blank line between) until the
    response alone has more characters than 8 x seq_len (>= 2 chars per token on both tokenizers, so both sides
    overflow and `PairedDataset` truncates them to exactly seq_len)."""
    records = load_records("dolly/train.jsonl", limit=count * 64)
    packed, cursor = [], 0
    for _ in range(count):
        head, parts = records[cursor], [records[cursor].response]
        cursor += 1
        while sum(len(p) + 2 for p in parts) <= 8 * seq_len:
            if cursor >= len(records):
                raise RuntimeError(f"not enough Dolly records to pack {count} examples of {seq_len} tokens")
            parts.append(records[cursor].response)
            cursor += 1
        packed.append(dataclasses.replace(head, response="\n\n".join(parts)))
    return packed


def build_batch(setting: Setting, method, student_tokenizer, teacher_tokenizer):
    dataset = PairedDataset(
        packed_records(setting.batch_size, setting.seq_len), student_tokenizer, teacher_tokenizer,
        setting.seq_len, setting.seq_len // 2,
    )
    extras = None if method is None else functools.partial(
        type(method).collate_extras, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer
    )
    collator = PairedCollator.for_tokenizers(student_tokenizer, teacher_tokenizer, extras)
    started = time.perf_counter()
    batch = collator([dataset[i] for i in range(len(dataset))])  # pairing + spans + method extras, as in workers
    return batch, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------------------
# Paper-scale models with random weights, built directly on the device (no weights are read).

# Qwen1.5-1.8B (Qwen2 architecture: q/k/v biases, untied head) and GPT-2 120M (GPT-2 small); tiny twins for CI.
PAPER_TEACHER = {
    "paper": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    "paper-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
}
# The tiny twin reads SmolLM2's 49k vocabulary instead of Qwen's 151k: MinED's edit-distance map over Qwen's vocabulary
# takes minutes to build (cached after), too long for the CI smoke run; the code path is the same.
PAPER_TOKENIZERS = {"paper": ("qwen1.5", "gpt2"), "paper-tiny": ("smollm2", "gpt2")}
PAPER_STUDENT = {
    "paper": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "paper-tiny": dict(n_embd=32, n_layer=2, n_head=2, n_positions=1024, vocab_size=50257),
}


def paper_models(models: str, device: torch.device, with_teacher: bool = True, teacher_bf16: bool = True):
    """(teacher, teacher tokenizer, student, student tokenizer): random Qwen2-shaped bf16 (or fp32) teacher (None
    without `with_teacher`: a cached row), GPT-2 student."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    teacher_tok, student_tok = (load_tokenizer(name) for name in PAPER_TOKENIZERS[models])
    torch.manual_seed(0)
    with torch.device(device):
        teacher = Qwen2ForCausalLM._from_config(
            Qwen2Config(**PAPER_TEACHER[models], pad_token_id=teacher_tok.pad_token_id,
                        eos_token_id=teacher_tok.eos_token_id, bos_token_id=teacher_tok.bos_token_id),
            dtype=torch.bfloat16 if teacher_bf16 else torch.float32,
        ) if with_teacher else None
        student = GPT2LMHeadModel._from_config(
            GPT2Config(**PAPER_STUDENT[models], pad_token_id=student_tok.pad_token_id,
                       eos_token_id=student_tok.eos_token_id, bos_token_id=student_tok.bos_token_id),
            dtype=torch.float32,
        )
    return teacher, teacher_tok, student, student_tok


# ---------------------------------------------------------------------------------------------------------------
# One training step per row (the engine's `_forward` + `train_step` for one micro-batch, without accelerate).


def eager_reference_views(method, batch, student, teacher):
    """The reference way of getting SRA's inputs: eager attention, every layer's maps returned, masses from maps.

    Teacher: base model (no token logits, as SRA needs none) under no_grad; student: full LM (logits for CE).
    `attention_row` holds the chosen layer's full [B, H, T, T] map, which `token_mass` reduces inside the loss;
    the outputs keep every layer's maps alive until the step ends, as the reference code's outputs do.
    """
    needs = method.needs()

    def view(lm, side, with_logits):
        out = (lm if with_logits else lm.base_model)(
            input_ids=side.input_ids, attention_mask=side.attention_mask, use_cache=False,
            output_attentions=True, output_hidden_states=with_logits,
        )
        layers = lm.config.get_text_config().num_hidden_layers
        last = out.hidden_states[-1] if with_logits else out.last_hidden_state  # final-norm output either way
        head = lm.get_output_embeddings()
        return ModelView(
            hidden={layers: last}, attention_row={i: out.attentions[i] for i in range(layers)},
            logits=out.logits if with_logits else None, lm_head_weight=head.weight, lm_head_bias=head.bias,
            num_layers=layers, input_embedding_weight=lm.get_input_embeddings().weight,
            logits_from_head=with_logits,  # HF returns the head's output as the logits (GPT-2, Llama, Qwen2)
        ), out

    # Only SRA's default layer pair (final-norm outputs) is served here: the reference aligns the last layer.
    if (needs.student_hidden_layers, needs.teacher_hidden_layers) != (
        (student.config.get_text_config().num_hidden_layers,), (teacher.config.get_text_config().num_hidden_layers,)
    ):
        raise ValueError(f"sra_eager serves SRA's final-norm layer pair only, the method needs {needs}")
    with torch.no_grad():
        teacher_view, teacher_out = view(teacher, batch.teacher, with_logits=False)
    student_view, student_out = view(student, batch.student, with_logits=True)
    return student_view, teacher_view, (teacher_out, student_out)


def authors_way_distill(method, batch, student, teacher) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(CE, SRA distill term) the way the authors' code computes them: eager attention with every layer's maps
    returned, the teacher's full forward (token logits over its whole vocabulary, which SRA never reads), masses from
    the last layer's maps, and the plain span KL (each head applied to the centres, the shared rows picked per step,
    unchunked, autograd through every [spans, V_shared] tensor). Single layer pair (the final-norm outputs), as the
    `sra` row."""
    config = method.config
    with torch.no_grad():
        teacher_out = teacher(input_ids=batch.teacher.input_ids, attention_mask=batch.teacher.attention_mask,
                              use_cache=False, output_attentions=True, output_hidden_states=True)
    student_out = student(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask,
                          use_cache=False, output_attentions=True, output_hidden_states=True)
    student_mass = token_mass(student_out.attentions[-1], batch.student.attention_mask)
    teacher_mass = token_mass(teacher_out.attentions[-1], batch.teacher.attention_mask)
    student_hidden, teacher_hidden = student_out.hidden_states[-1], teacher_out.hidden_states[-1]
    out = sra_loss(student_hidden, teacher_hidden, student_mass, teacher_mass, batch.student.span_ids,
                   batch.teacher.span_ids, method.projectors[0], num_spans=batch.num_spans, config=config)
    student_centers, _, student_valid = span_centers(student_hidden, student_mass, batch.student.span_ids,
                                                     batch.num_spans)
    teacher_centers, _, teacher_valid = span_centers(teacher_hidden, teacher_mass, batch.teacher.span_ids,
                                                     batch.num_spans)
    valid = student_valid & teacher_valid

    def logits(head, rows, states):
        weight = head.weight[rows.to(head.weight.device)]
        bias = None if head.bias is None else head.bias[rows.to(head.weight.device)]
        return torch.nn.functional.linear(states.to(weight.dtype), weight, bias).float() / config.temperature

    student_logits = logits(student.get_output_embeddings(), method.student_rows, student_centers[valid])
    with torch.no_grad():
        teacher_logits = logits(teacher.get_output_embeddings(), method.teacher_rows, teacher_centers[valid])
    kl = torch.nn.functional.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                                    reduction="sum") / valid.shape[0]
    # Their CE: `F.cross_entropy` on the shifted logits, as every causal-LM trainer writes it.
    _, targets = next_token_targets(batch.student.labels)
    ce = torch.nn.functional.cross_entropy(student_out.logits[:, :-1].float().reshape(-1, student_out.logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=IGNORE_INDEX)
    # outputs alive until the step ends, as theirs
    return ce, out["span_total"] + kl, (teacher_out, student_out)


def make_step(row: str, cfg, method, student, teacher, optimizer, batch, student_bf16: bool = False, cache=None):
    needs = method.needs() if method is not None else None
    uses_teacher = method_settings(cfg).uses_teacher
    device_type = batch.student.input_ids.device.type

    def views():
        if row == "floor":
            with torch.no_grad():
                capture(teacher, batch.teacher.input_ids, batch.teacher.attention_mask, logits=False)
            return capture(student, batch.student.input_ids, batch.student.attention_mask, logits=True), None, None
        if row == "sra_eager":
            return eager_reference_views(method, batch, student, teacher)
        teacher_view = None
        if uses_teacher and cache is not None:  # the engine's teacher_cache path
            teacher_view = cache.view(batch.teacher, needs)
        elif uses_teacher:
            with torch.no_grad():
                teacher_view = capture(
                    teacher, batch.teacher.input_ids, batch.teacher.attention_mask,
                    hidden_layers=needs.teacher_hidden_layers, attention_layers=needs.teacher_attention_layers,
                    logits=needs.teacher_logits,
                )
        student_view = capture(
            student, batch.student.input_ids, batch.student.attention_mask,
            hidden_layers=needs.student_hidden_layers, attention_layers=needs.student_attention_layers, logits=True,
        )
        return student_view, teacher_view, None

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def forward_loss():
        if row == "sra_authors":
            ce, distill, keep_alive = authors_way_distill(method, batch, student, teacher)
            return cfg.alpha * ce + (1.0 - cfg.alpha) * distill, keep_alive
        student_view, teacher_view, keep_alive = views()
        out = method(batch, student_view, teacher_view) if needs is not None and uses_teacher else {}
        ce = out["ce"] if "ce" in out else causal_lm_ce(student_view.logits, batch.student.labels)  # as the engine
        if "distill" not in out:
            return ce, (student_view, keep_alive)
        return cfg.alpha * ce + (1.0 - cfg.alpha) * out["distill"], (student_view, keep_alive)

    def step() -> None:
        # bf16 autocast as accelerate's `precision: bf16` runs the student (weights and optimiser stay float32).
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=student_bf16):
            loss, _keep_alive = forward_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def load_models(cfg, setting: Setting, device: torch.device, with_teacher: bool = True):
    """(teacher, teacher tokenizer, student, student tokenizer) of the setting's pair; teacher None without
    `with_teacher`."""
    if setting.models != "demo":
        return paper_models(setting.models, device, with_teacher, setting.teacher_bf16)
    teacher, teacher_tok = load_model(
        cfg.teacher, tokenizer=cfg.teacher_tokenizer, arch=cfg.teacher_arch, dtype=cfg.teacher_precision,
        seed=cfg.seed + 1,
    ) if with_teacher else (None, teacher_tokenizer_of(cfg))
    student, student_tok = load_model(
        cfg.student, tokenizer=cfg.student_tokenizer, arch=cfg.student_arch, dtype=torch.float32, seed=cfg.seed
    )
    return teacher, teacher_tok, student, student_tok


def call_times(function, calls: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of each of `calls` calls of `function()`, the device synchronised after each."""
    times, cpu_times = [], []
    for _ in range(calls):
        started, cpu_started = time.perf_counter(), time.process_time()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return times, cpu_times


def timed(function, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `function()` over `repeats` calls, after one unmeasured call."""
    times, cpu_times = call_times(function, repeats + 1, device)
    return statistics.median(times[1:]), statistics.median(cpu_times[1:])


def build_cache(method_name: str, setting: Setting) -> dict:
    """Write the teacher cache of the method's batch (the teacher's precision) for its cached row, timing the build
    (capture + writing the shard) against a bare teacher forward (base model, nothing captured)."""
    device = torch.device(setting.device)
    if setting.threads:
        torch.set_num_threads(setting.threads)
    cfg = load_config(None, setting.overrides(method_name))
    teacher, teacher_tok, student, student_tok = load_models(cfg, setting, device)
    teacher.eval().requires_grad_(False)
    method, _ = build_method(cfg, student, teacher, student_tok, teacher_tok)
    batch, _ = build_batch(setting, method, student_tok, teacher_tok)
    teacher.to(device)
    side = batch.teacher.to(device)
    layout = Layout.for_needs([method.needs()], teacher.config.get_text_config().num_hidden_layers,
                              logits_from_head(teacher, side))
    folder = Path(setting.cache_root) / method_name
    folder.mkdir(parents=True, exist_ok=True)
    dtype = cfg.teacher_precision
    shard = folder / "shard-00000.safetensors"

    def bare_forward():
        with torch.no_grad():
            capture(teacher, side.input_ids, side.attention_mask, logits=False)

    bare_s, bare_cpu_s = timed(bare_forward, setting.steps, device)
    build_s, build_cpu_s = timed(lambda: write_shard(teacher, [side], layout, dtype, shard), setting.steps, device)
    # As the step goals: with one thread, CPU seconds are the build's own work even on a shared core.
    ratio = bare_cpu_s / build_cpu_s if setting.threads == 1 else bare_s / build_s
    finish_cache(folder, {"layout": dataclasses.asdict(layout), "dtype": dtype}, teacher)
    response_tokens = int(batch.teacher.labels.ne(-100).sum())
    return {
        "method": f"build:{method_name}", "bare_forward_s": bare_s, "build_s": build_s,
        "bare_forward_cpu_s": bare_cpu_s, "build_cpu_s": build_cpu_s,
        "throughput_vs_bare": ratio, "shard_bytes": shard.stat().st_size,
        "bytes_per_response_token": shard.stat().st_size / response_tokens,
        "head_bytes": (folder / "head.safetensors").stat().st_size, "dtype": dtype, "layout": str(layout),
    }


def measure(row: str, setting: Setting) -> dict:
    """Load everything, then time `warmup + steps` steps; the child process's whole job."""
    device = torch.device(setting.device)
    if setting.threads:
        torch.set_num_threads(setting.threads)
    cfg = load_config(None, setting.overrides(row))
    cache = TeacherCache(Path(setting.cache_root) / METHOD_OF_ROW[row]) if row in CACHED_ROWS else None
    teacher, teacher_tok, student, student_tok = load_models(cfg, setting, device, with_teacher=cache is None)
    teacher = teacher if cache is None else cache.head  # a cached row never loads the teacher
    teacher.eval().requires_grad_(False)
    student.train()
    method, method_lr = (None, None) if row == "floor" else build_method(
        cfg, student, teacher, student_tok, teacher_tok
    )
    if row in ("sra_eager", "sra_authors"):
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")
    batch, collate_s = build_batch(setting, method, student_tok, teacher_tok)
    teacher.to(device)
    student.to(device)
    batch = batch.to(device)
    groups = [{"params": list(student.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if method is not None:
        method.to(device)
        method_params = [p for p in method.parameters() if p.requires_grad]
        if method_params:
            groups.append({"params": method_params, "lr": method_lr, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    step = make_step(row, cfg, method, student, teacher, optimizer, batch, setting.student_bf16, cache)

    meter = MemoryMeter(device)
    meter.mark_loaded()
    times, cpu_times = call_times(step, setting.warmup + setting.steps, device)
    measured = times[setting.warmup:]
    profile = profile_step(step, setting.profile) if setting.profile else None
    return {
        "method": row, "step_s": statistics.median(measured), "step_times_s": measured,
        # CPU seconds of all threads: less sensitive than wall time to other processes sharing the cores.
        "step_cpu_s": statistics.median(cpu_times[setting.warmup:]), **meter.report(),
        "collate_s": collate_s, "batch": list(batch.student.input_ids.shape),
        "teacher_tokens": list(batch.teacher.input_ids.shape), "spans": int(batch.num_spans.sum()),
        "device": str(device), **({"profile": profile} if profile else {}),
    }


def profile_step(step, top: int) -> list[dict]:
    """One more step under torch.profiler: its `top` ops by self CPU time (diagnostics, not a measured figure)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops]


# ---------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per row (and per round), a table with ratios to floor, goals, JSON.


def prepare(models: str) -> None:
    """Build what the rows read from disk caches (shared vocabulary, MinED's vocabulary map) ahead of the runs."""
    from sra_distill.data.vocab import shared_vocab
    from sra_distill.losses.mined_map import build_mined_map

    teacher_tok, student_tok = (load_tokenizer(name) for name in PAPER_TOKENIZERS[models])
    started = time.perf_counter()
    shared = shared_vocab(student_tok, teacher_tok)
    mined = build_mined_map(student_tok, teacher_tok)
    print(f"prepared {models}: shared vocabulary {shared.size} ids, MinED map over {mined.numel()} teacher ids, "
          f"{time.perf_counter() - started:.1f} s")


def run_child(row: str, setting: Setting, timeout: float | None = None) -> dict:
    command = [sys.executable, __file__, "--child", row, "--setting", json.dumps(dataclasses.asdict(setting))]
    env = dict(os.environ)
    if setting.mmap_threshold is not None:  # read by glibc when the process starts
        env["MALLOC_MMAP_THRESHOLD_"] = str(setting.mmap_threshold)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as expired:
        raise RuntimeError(f"row {row!r} ran past its {timeout:.0f} s limit") from expired
    if done.returncode != 0:
        raise RuntimeError(f"row {row!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine_rounds(results: list[dict]) -> dict:
    """Several rounds of a row: the fastest round's step medians (other processes only ever add time), the median
    of the memory figures (one round: that round's figures)."""
    row = dict(results[0])
    for key in ("step_s", "step_cpu_s"):
        row[key] = min(r[key] for r in results)
    for key in ("peak_mb", "loaded_mb", "step_increase_mb", "rss_peak_mb", "rss_loaded_mb",
                "rss_step_increase_mb", "collate_s"):
        row[key] = statistics.median(r[key] for r in results)
    row["step_times_s"] = [t for r in results for t in r["step_times_s"]]
    row["rounds"] = len(results)
    return row


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {
        "cpu": model.group(1) if model else platform.processor(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


def goal_results(rows: dict[str, dict], setting: Setting) -> list[dict]:
    out = []
    for text, row, metric, ref, bound, sense in goals_for(setting):
        if row in rows and ref in rows:
            ratio = rows[row][metric] / rows[ref][metric]
            met = ratio <= bound if sense == "<=" else ratio >= bound
            out.append({"goal": text, "ratio": round(ratio, 3), "met": met})
    return out


def table(rows: list[dict]) -> str:
    floor = next((r for r in rows if r["method"] == "floor"), None)

    def ratio(r, key):
        return f"{r[key] / floor[key]:.2f}x" if floor and floor[key] > 0 else "-"

    lines = [
        "| row | step s | vs floor | CPU s/step | vs floor | peak MB | vs floor | step increase MB | vs floor "
        "| collate s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['step_s']:.3f} | {ratio(r, 'step_s')} | {r['step_cpu_s']:.2f} | "
            f"{ratio(r, 'step_cpu_s')} | {r['peak_mb']:.0f} | {ratio(r, 'peak_mb')} "
            f"| {r['step_increase_mb']:.0f} | {ratio(r, 'step_increase_mb')} | {r['collate_s']:.2f} |"
        )
    return "\n".join(lines)


def paper_table(rows: list[dict]) -> str:
    """Absolute figures next to the paper's cost table, and each row against `sra` on both sides."""
    ours_sra = next((r for r in rows if r["method"] == "sra"), None)
    paper_sra = PAPER_COST["sra"][0]

    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    lines = ["| row | s/step | peak GB | vs sra (time) | paper s/step | paper peak GB | paper vs SRA (time) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        paper_s, paper_gb = PAPER_COST.get(r["method"], (None, None))
        ours_ratio = r["step_s"] / ours_sra["step_s"] if ours_sra else None
        lines.append(
            f"| {r['method']} | {r['step_s']:.3f} | {r['peak_mb'] / 1024:.2f} | {fmt(ours_ratio, '{:.2f}x')} | "
            f"{fmt(paper_s, '{:.3f}')} | {fmt(paper_gb, '{:.2f}')} | "
            f"{fmt(None if paper_s is None else paper_s / paper_sra, '{:.2f}x')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8x128, 1+2 steps, rows floor/sra/sra_eager")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence, both sides (default 256, quick 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--student-hidden", type=int, default=256, help="student width (768 + 12 layers ~ GPT-2 120M)")
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, help="unmeasured steps first (default 1)")
    parser.add_argument("--steps", type=int, help="measured steps (default 4, quick 2)")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="subprocesses per row, interleaved (fastest round's time, median memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=MODELS, default="demo",
                        help="demo: packaged SmolLM2 teacher + toy student; paper: random Qwen1.5-1.8B-shaped teacher "
                             "+ GPT-2 120M student, 8x512, the paper's rows (paper-tiny: tiny shapes, same path)")
    parser.add_argument("--student-precision", choices=("fp32", "bf16"),
                        help="student forward in float32 or under bf16 autocast (default: bf16 for --models paper*)")
    parser.add_argument("--teacher-precision", choices=("bf16", "fp32"), default="bf16",
                        help="the teacher's dtype and its caches' (fp32 on a CPU without native bf16)")
    parser.add_argument("--keep-going", action="store_true",
                        help="a row that fails is reported and left out instead of stopping the run (exit 1 at the end)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per row; 1 avoids OpenMP spin-waits on a core shared with others")
    parser.add_argument("--row-timeout", type=float, help="seconds one row's subprocess may take (default: no limit)")
    parser.add_argument("--mmap-threshold", type=int,
                        help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) for the rows, e.g. 1048576: allocations above it "
                             "are returned to the system when freed, so peak memory follows the live tensors rather "
                             "than glibc's retained heap (default: glibc's own dynamic threshold)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only build the disk caches the --models paper* rows read (MinED map), then exit")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one more step per row and print its N costliest ops by self CPU time")
    parser.add_argument("--json", type=Path, help="write {'rows': [...], 'machine': ..., 'goals': ...} here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child_setting = Setting(**json.loads(args.setting))
        if args.child.startswith("build:"):
            print(json.dumps(build_cache(args.child.split(":", 1)[1], child_setting)))
        else:
            print(json.dumps(measure(args.child, child_setting)))
        return

    quick, paper = args.quick, args.models != "demo"
    if args.prepare_only:
        if not paper:
            parser.error("--prepare-only goes with --models paper or paper-tiny")
        prepare(args.models)
        return
    student_hidden, student_layers = args.student_hidden, args.student_layers
    if paper:  # the shapes are fixed by the preset; recorded so the goals and the JSON say what ran
        student_hidden, student_layers = PAPER_STUDENT[args.models]["n_embd"], PAPER_STUDENT[args.models]["n_layer"]
    setting = Setting(
        seq_len=args.seq_len or (128 if quick else 512 if paper else 256), batch_size=args.batch_size,
        warmup=1 if args.warmup is None else args.warmup, steps=args.steps or (2 if quick else 4),
        device=args.device, student_hidden=student_hidden, student_layers=student_layers, models=args.models,
        student_bf16=(args.student_precision or ("bf16" if paper else "fp32")) == "bf16", threads=args.threads,
        teacher_bf16=args.teacher_precision == "bf16", profile=args.profile,
        mmap_threshold=args.mmap_threshold,
    )
    rows = tuple(args.rows.split(",")) if args.rows else (QUICK_ROWS if quick else PAPER_ROWS if paper else ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if setting.seq_len < 16 or setting.batch_size < 1 or setting.steps < 1 or args.rounds < 1:
        parser.error("need --seq-len >= 16, --batch-size >= 1, --steps >= 1, --rounds >= 1")

    info = machine()
    print(f"step cost: models {setting.models}, batch {setting.batch_size}x{setting.seq_len}, {setting.warmup} "
          f"warm-up + {setting.steps} measured steps, {args.rounds} round(s), device {setting.device}, student "
          f"{'bf16 autocast' if setting.student_bf16 else 'fp32'}, teacher "
          f"{'bf16' if setting.teacher_bf16 else 'fp32'}; {info['cpu']}, {info['cores']} cores, "
          f"GPU {info['gpu']}, torch {info['torch']}, load average {info['load_average'][0]:.1f}, malloc mmap "
          f"threshold {setting.mmap_threshold or 'glibc default'}", flush=True)
    per_row: dict[str, list[dict]] = {r: [] for r in rows}
    failed: dict[str, str] = {}
    cache_root = tempfile.TemporaryDirectory(prefix="step_cost_teacher_cache_")
    setting = dataclasses.replace(setting, cache_root=cache_root.name)
    builds = []
    for method in dict.fromkeys(METHOD_OF_ROW[r] for r in rows if r in CACHED_ROWS):
        build = run_child(f"build:{method}", setting, args.row_timeout)
        builds.append(build)
        print(f"  teacher cache for {method}: build {build['build_s']:.3f} s ({build['build_cpu_s']:.2f} CPU s) vs "
              f"bare teacher forward {build['bare_forward_s']:.3f} s ({build['bare_forward_cpu_s']:.2f} CPU s): "
              f"{build['throughput_vs_bare']:.2f}x its throughput, "
              f"{build['bytes_per_response_token']:.0f} bytes per response token ({build['dtype']}), "
              f"head {build['head_bytes'] / 2**20:.1f} MiB", flush=True)
    for round_index in range(args.rounds):
        for row in rows:
            if row in failed:
                continue
            try:
                result = run_child(row, setting, args.row_timeout)
            except RuntimeError as error:
                if not args.keep_going:
                    raise
                failed[row] = str(error)
                print(f"  round {round_index + 1} {row}: FAILED\n{error}", flush=True)
                continue
            per_row[row].append(result)
            print(f"  round {round_index + 1} {row}: {result['step_s']:.3f} s/step, peak {result['peak_mb']:.0f} MB "
                  f"(+{result['step_increase_mb']:.0f} MB over loaded)", flush=True)
            for op in result.get("profile", ()):
                print(f"      {op['self_cpu_s']:8.3f} s self CPU  {op['calls']:6d} calls  {op['op']}", flush=True)
    results = [combine_rounds(per_row[r]) for r in rows if per_row[r]]
    # The tiny twin only proves the code path runs; its ratios say nothing about the goals.
    goals = [] if setting.models == "paper-tiny" else goal_results({r["method"]: r for r in results}, setting)
    info["load_average_end"] = os.getloadavg()
    cache_root.cleanup()
    print(table(results))
    if paper:
        print("\nNext to the paper's cost table (Qwen1.5-1.8B -> GPT-2 120M; their GPU and code, ours random weights):")
        print(paper_table(results))
    for goal in goals:
        print(f"{'MET ' if goal['met'] else 'MISS'} {goal['goal']}: {goal['ratio']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"setting": dataclasses.asdict(setting), "rounds": args.rounds, "machine": info, "rows": results,
             "goals": goals, "cache_builds": builds, "failed": failed, "paper_cost": PAPER_COST if paper else None}, indent=1) + "\n")
    if failed:
        print(f"rows that failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The training engine: one teacher pass and one student pass per micro-batch, a method's loss, accelerate.

Per optimiser step the engine draws `grad_accum` micro-batches, counts their response tokens and samples across all
processes, and weights each micro-batch so the update equals one big batch: N processes x batch b x accumulation a
gives the same gradient as one process with batch N*a*b (losses are global means, not means of means; the
arithmetic is `weighting.py`).

Outputs under `output_dir`: `metrics.jsonl`, `checkpoints/step-N/` (written atomically: a temporary directory,
then a rename), `final/` (the student and its tokenizer, loadable with `from_pretrained`), `best/` (best dev
ROUGE-L when `eval_every` > 0), `loss_curves.png`, `config.yaml`.

Many processes (`torchrun` or `accelerate launch`; on CPU-only machines gloo): the data loader is sharded by
accelerate, the student (and the method's trainable modules) are wrapped by accelerate (DDP, or FSDP from an
accelerate config), files are written by the main process only. `teacher_sharding: fsdp` splits a frozen teacher
too large for one device across the processes (see `shard_teacher`). A method that never runs the teacher (SFT)
loads none and tokenises the student's side only. With `teacher_cache` the teacher's states are read from a
`sra teacher-cache` folder (`teacher_cache.py`) and only its head loads.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from sra_distill.config import Config, method_settings, save_config
from sra_distill.data.batch import PairedBatch, next_token_targets
from sra_distill.data.collate import PairedCollator, PairedDataset
from sra_distill.data.pairing import count_truncation
from sra_distill.data.records import load_records, load_records_with_report
from sra_distill.errors import ConfigError, DataError, RunFolderError, RunStopped
from sra_distill.evaluation.evaluate import dev_rouge
from sra_distill.evaluation.generate import generate
from sra_distill.evaluation.model_card import write_hub_files
from sra_distill.evaluation.plots import plot_loss_curves
from sra_distill.losses.logit_losses import causal_lm_ce
from sra_distill.models.capture import capture, causal_lm_of, decoder_blocks, last_block_parameters
from sra_distill.models.load import load_model
from sra_distill.paths import build_lock
from sra_distill.quiet import quiet_libraries
from sra_distill.run_files import (
    METRICS_NAME,
    TRAINER_STATE_NAME,
    append_metric_row,
    checkpoint_folders,
    keep_metric_rows_until,
    publish_checkpoint,
    replace_dir,
    skipped_checkpoint_warning,
    verify_manifest,
    write_manifest,
)
from sra_distill.train.methods import build_method, projector_groups
from sra_distill.train.on_policy import OnPolicyDistiller
from sra_distill.train.runfolder import (
    StopSignals,
    check_resume_settings,
    claim_output_dir,
    remove_if_empty,
    resume_command,
    write_fingerprint,
)
from sra_distill.train.teacher_cache import MANIFEST_NAME as CACHE_MANIFEST
from sra_distill.train.teacher_cache import (
    TeacherCache,
    auto_cache_folder,
    build_teacher_cache,
    load_frozen_teacher,
    teacher_tokenizer_of,
)
from sra_distill.train.trackers import build_trackers, finish_trackers, log_row, start_trackers
from sra_distill.train.weighting import MicroBatchWeights, gradmag_alpha, micro_batch_weights
from sra_distill.validation import validate_settings, warn_long_warmup


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint so a resume continues at the same batch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    consecutive_bad_steps: int = 0
    skipped_steps: int = 0
    best_dev_rouge: float | None = None
    best_step: int | None = None


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    metrics_path: Path
    steps: int
    last_metrics: dict = field(default_factory=dict)
    best_dir: Path | None = None
    plot_path: Path | None = None


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine decay to `min_ratio` of it."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def shard_teacher(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Split a frozen teacher's decoder blocks across all processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    Each process keeps 1/N of every block's weights; a block's full weights are gathered just before it runs and
    freed right after (`reshard_after_forward`), so device memory is ~teacher/N + one block + activations. The
    embeddings, final norm and LM head stay whole on every process: they are a few percent of a large model, tied
    embeddings then need no special care, and `capture(logits=False)` can run the base model alone. Every process
    must run the teacher on every step (its forward is a collective), which the engine does.
    """
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in decoder_blocks(causal_lm_of(teacher)):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)  # moves the block's shards to `device`
    return teacher.to(device)  # the unsharded rest


def finite_on_every_process(accelerator: Accelerator, finite: bool) -> bool:
    """True when this step's loss was finite on every process, so all of them take (or skip) the step together.
    accelerate's `reduce` knows only sum, mean and max (any other word sums), so the non-finite flag is max-reduced."""
    non_finite = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
    return not bool(accelerator.reduce(non_finite, "max"))


def epoch_order(seed: int, epoch: int, num_records: int) -> list[int]:
    """The training records' order in `epoch`: an explicit permutation, the same on every process and after a
    resume."""
    return torch.randperm(num_records, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def records_read(cfg: Config, num_records: int, num_processes: int = 1) -> list[int]:
    """The indices (sorted) of the training records a run of `cfg` reads: its `max_steps` optimiser steps take
    grad_accum batches per process each, from the epochs' orders in turn (every record when it has no max_steps).
    What a teacher cache must hold to serve that run alone (`sra compare` builds one per training seed)."""
    if not cfg.max_steps:
        return list(range(num_records))
    batches = cfg.max_steps * cfg.grad_accum * num_processes  # each process takes its own batches of the sequence
    read: set[int] = set()
    epoch = 0
    while batches > 0 and len(read) < num_records:
        order = epoch_order(cfg.seed, epoch, num_records)
        taken = order[:batches * cfg.batch_size]
        read.update(taken)
        batches -= -(-len(taken) // cfg.batch_size)  # the epoch's last batch may be short
        epoch += 1
    return sorted(read)


class Trainer:
    """Builds everything from a `Config` and runs `train()`; see the module docstring."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None):
        validate_settings(cfg)  # bad settings stop here, before anything loads
        quiet_libraries(cfg.progress)
        self.claim = None
        new_folder = not Path(cfg.output_dir).exists()
        try:
            self._build(cfg, accelerator)
        except BaseException:
            self.close()
            if new_folder:  # a run that failed before writing anything leaves no empty output_dir behind
                remove_if_empty(Path(cfg.output_dir))
            raise

    def close(self) -> None:
        """Release output_dir (train() does at its end; call this for a Trainer that never trains)."""
        if self.claim is not None:
            self.claim.release()

    def _build(self, cfg: Config, accelerator: Accelerator | None) -> None:
        """The set-up steps, in order; each reads what the ones before it made."""
        self.cfg = cfg
        self._setup_accelerator(accelerator)
        self._claim_output_dir()
        records = self._load_training_records()  # a malformed record stops the run before any model loads
        self._load_models()
        self._build_method()
        self._add_lora()
        self._build_data_pipeline(records)
        self._plan_steps()
        self._build_optimizer()
        self._place_on_devices()
        self.state = TrainState()

    def _setup_accelerator(self, accelerator: Accelerator | None) -> None:
        cfg = self.cfg
        # Accumulation is done here (see train_step), not by accelerate's counter, so micro-batches can be weighted.
        # Without an accelerator device, accelerate only takes the multi-process CPU (gloo) path when told `cpu`;
        # otherwise `torchrun` on a CPU machine would give N independent single-process runs.
        # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule num_processes times per
        # optimiser step (it assumes the per-process batch stays fixed); here one step is one global batch.
        trackers = build_trackers(cfg)  # a tracker whose package is missing stops the run here, before any model
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.precision, cpu=not torch.accelerator.is_available(),
            step_scheduler_with_optimizer=False, log_with=trackers or None,
        )
        if accelerator is not None:
            accelerator.log_with.extend(trackers)
        acc = self.accelerator
        self.student_fsdp = acc.distributed_type == DistributedType.FSDP
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.student_fsdp:
            # accelerate applies FSDP only on accelerator devices; on CPU processes it would silently train DDP.
            raise ConfigError(f"the accelerate config asks for FSDP, but accelerate runs {acc.distributed_type} "
                              f"on {acc.device.type}, where it does not shard; use a DDP accelerate config here (the "
                              f"checkout has configs/accelerate/ddp.yaml)")
        if self.student_fsdp and cfg.balance == "gradmag":
            raise ConfigError("balance=gradmag with an FSDP student: GradMag reads the last block's whole gradient, "
                              "which FSDP shards; use DDP (configs/accelerate/ddp.yaml) or balance=alpha")
        if self.student_fsdp and cfg.lora.enabled:
            raise ConfigError("lora.enabled with an FSDP student: LoRA trains few parameters, use DDP "
                              "(the checkout has configs/accelerate/ddp.yaml) and teacher_sharding=fsdp if the "
                              "teacher is large")
        set_seed(cfg.seed)

    def _claim_output_dir(self) -> None:
        """Lock the folder and apply the fresh / resume rules (runfolder.py) before anything is loaded or written."""
        acc = self.accelerator
        self.output_dir = Path(self.cfg.output_dir)
        self.claim = claim_output_dir(self.cfg, acc.num_processes, acc.is_main_process)
        acc.wait_for_everyone()  # overwrite=true: the main process has cleared the folder

    def _load_training_records(self) -> list:
        cfg = self.cfg
        records, self.data_report = load_records_with_report(cfg.train_data, limit=cfg.max_train_examples)
        if not records:
            raise DataError(f"{cfg.train_data}: no usable training records ({self.data_report.summary()})")
        self.num_records = len(records)
        return records

    def _load_models(self) -> None:
        """The frozen teacher (with its adapter merged, if any; none for a method that never runs it, and only its
        head from `teacher_cache` when one is set) and the student."""
        cfg = self.cfg
        self.teacher = self.teacher_tokenizer = self.teacher_cache = None
        self.uses_teacher = method_settings(cfg).uses_teacher
        self._balance_params: list[torch.nn.Parameter] | None = None  # balance=gradmag's (`_alpha`)
        cached = self.uses_teacher and bool(cfg.teacher_cache)
        if self.uses_teacher and not cached:
            self.teacher, self.teacher_tokenizer = load_frozen_teacher(cfg)
        self.student, self.student_tokenizer = load_model(
            cfg.student, tokenizer=cfg.student_tokenizer, arch=cfg.student_arch, dtype="fp32",
            seed=cfg.seed, trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download,
            layers=cfg.student_layers,
        )
        if cached:
            self._open_teacher_cache()

    def _reads_an_epoch(self) -> bool:
        """Whether this run reads every training record at least once (`teacher_cache=auto` builds only then)."""
        cfg = self.cfg
        if not cfg.max_steps:
            return True
        return cfg.max_steps * cfg.batch_size * cfg.grad_accum * self.accelerator.num_processes >= self.num_records

    def _open_teacher_cache(self) -> None:
        """teacher_cache: the teacher's states come from a `sra teacher-cache` folder, checked against this run's
        settings and checksums now, before training; only its head (and embeddings) load."""
        cfg = self.cfg
        self.teacher_tokenizer = teacher_tokenizer_of(cfg)
        folder = cfg.teacher_cache
        if folder == "auto":  # built on first use (every process builds its share), then reused
            folder = auto_cache_folder(cfg, self.student_tokenizer, self.teacher_tokenizer)
            # Two single-process runs started together (a comparison's parallel workers) build it once: the second
            # waits for the first's lock, then reuses. A multi-process build is collective, so it takes no lock.
            with build_lock(folder) if self.accelerator.num_processes == 1 else contextlib.nullcontext():
                if not (folder / CACHE_MANIFEST).is_file() and not self._reads_an_epoch():
                    # A cache of every record costs about one epoch of teacher forwards: a shorter run (a short
                    # budget, a comparison's runs) pays less running the teacher live. Loaded with the RNG state
                    # kept, so the run is the one a live-teacher run would be.
                    if self.accelerator.is_main_process:
                        print(f"teacher cache: not built (teacher_cache=auto): this run reads less than one epoch "
                              f"of the {self.num_records} training records, so the live teacher costs less than a "
                              f"cache of them all", flush=True)
                    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
                    with torch.random.fork_rng(devices=cuda):
                        self.teacher, self.teacher_tokenizer = load_frozen_teacher(cfg)
                    return
                if not (folder / CACHE_MANIFEST).is_file():
                    if self.accelerator.is_main_process:
                        print(f"teacher cache: building {folder} (teacher_cache=auto; later runs reuse it)",
                              flush=True)
                    build_teacher_cache(cfg, folder, accelerator=self.accelerator)
                elif self.accelerator.is_main_process:
                    print(f"teacher cache: reusing {folder}", flush=True)
        self.teacher_cache = TeacherCache.open(folder, cfg, self.student_tokenizer, self.teacher_tokenizer)

    def _build_method(self) -> None:
        teacher = self.teacher if self.teacher_cache is None else self.teacher_cache.head
        self.method, self.method_lr = build_method(
            self.cfg, self.student, teacher, self.student_tokenizer, self.teacher_tokenizer
        )
        self.needs = self.method.needs()
        if self.teacher_cache is not None:
            self.teacher_cache.check_needs(self.cfg.method, self.needs)

    def _add_lora(self) -> None:
        lora = self.cfg.lora
        if lora.enabled:
            from peft import LoraConfig, get_peft_model  # local: peft is heavy to import and only needed for LoRA

            self.student = get_peft_model(self.student, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ))

    def _build_data_pipeline(self, records: list) -> None:
        """The paired dataset, its collator (with the method's per-batch extras) and the on-policy generator."""
        cfg = self.cfg
        self.dataset = PairedDataset(
            records, self.student_tokenizer, self.teacher_tokenizer, cfg.max_length, cfg.max_prompt_length
        )
        self.collator = PairedCollator.for_tokenizers(
            self.student_tokenizer, self.teacher_tokenizer,
            extras_fn=functools.partial(
                type(self.method).collate_extras, student_tokenizer=self.student_tokenizer,
                teacher_tokenizer=self.teacher_tokenizer,
            ),
        )
        self.on_policy = OnPolicyDistiller.from_config(  # None unless on_policy.ratio > 0
            cfg, self.student_tokenizer, self.teacher_tokenizer, self.collator, self.accelerator,
            student_fsdp=self.student_fsdp,
        )

    def _plan_steps(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        micro_per_epoch = math.ceil(len(self.dataset) / (cfg.batch_size * acc.num_processes))
        self.steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        if cfg.warmup_steps > self.total_steps and acc.is_main_process:
            warn_long_warmup(cfg.warmup_steps, self.total_steps)

    def _build_optimizer(self) -> None:
        """AdamW over the student (no decay on biases and norms) and the method's own parameters at their lr, and
        the warm-up + cosine schedule."""
        cfg = self.cfg
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        ]
        method_decay = cfg.weight_decay if cfg.projector_weight_decay is None else cfg.projector_weight_decay
        groups += projector_groups(self.method, self.method_lr, method_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        )

    def _place_on_devices(self) -> None:
        """accelerate wraps the student and the method (DDP / FSDP); the teacher goes whole to each device or is
        sharded across the processes (`teacher_sharding`)."""
        acc = self.accelerator
        if any(p.requires_grad for p in self.method.parameters()):
            self.student, self.method, self.optimizer, self.scheduler = acc.prepare(
                self.student, self.method, self.optimizer, self.scheduler
            )
        else:  # DDP refuses a module with nothing to train; a parameter-free method runs as it is
            self.student, self.optimizer, self.scheduler = acc.prepare(self.student, self.optimizer, self.scheduler)
            self.method.to(acc.device)
        if self.teacher_cache is not None:
            self.teacher_cache.to(acc.device)
        if self.teacher is None:
            return
        if self.cfg.teacher_sharding == "fsdp" and acc.num_processes > 1:
            self.teacher = shard_teacher(self.teacher, acc.device)
        else:  # one process: nothing to shard across
            self.teacher.to(acc.device)

    # ----------------------------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(self.cfg.seed, epoch, len(self.dataset))

    def _epoch_loader(self, epoch: int) -> DataLoader:
        loader = DataLoader(
            Subset(self.dataset, self._epoch_order(epoch)), batch_size=self.cfg.batch_size, shuffle=False,
            collate_fn=self.collator, num_workers=self.cfg.num_workers,
            # Its own generator: creating an iterator must not draw from the global RNG that dropout uses,
            # or a resumed run (iterator created after the RNG restore) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.seed + epoch),
        )
        return self.accelerator.prepare_data_loader(loader, device_placement=True)

    def _micro_batches(self):
        """Yields lists of `grad_accum` micro-batches forever (epochs roll over), resuming at the saved position."""
        cfg, state = self.cfg, self.state
        while True:
            loader = self._epoch_loader(state.epoch)
            iterator = iter(self.accelerator.skip_first_batches(loader, state.batches_in_epoch)
                            if state.batches_in_epoch else loader)
            group = []
            for batch in iterator:
                state.batches_in_epoch += 1
                group.append(batch)
                if len(group) == cfg.grad_accum:
                    yield group
                    group = []
            state.epoch += 1
            state.batches_in_epoch = 0

    def _global_counts(self, group: list[PairedBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = sum(next_token_targets(b.student.labels)[0].sum() for b in group)
        samples = sum(torch.tensor(b.batch_size, device=self.accelerator.device) for b in group)
        counts = torch.stack([tokens.float(), samples.float()]).to(self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return counts[0].clamp(min=1), counts[1].clamp(min=1)

    def _forward(self, batch: PairedBatch) -> dict[str, torch.Tensor]:
        needs, acc = self.needs, self.accelerator
        teacher_view = None
        if self.uses_teacher and self.teacher_cache is not None:
            teacher_view = self.teacher_cache.view(batch.teacher, needs)
        elif self.uses_teacher:
            with torch.no_grad():
                teacher_view = capture(
                    self.teacher, batch.teacher.input_ids, batch.teacher.attention_mask,
                    hidden_layers=needs.teacher_hidden_layers,
                    attention_layers=needs.teacher_attention_layers,
                    logits=needs.teacher_logits,
                )
        with acc.autocast():
            student_view = capture(
                self.student, batch.student.input_ids, batch.student.attention_mask,
                hidden_layers=needs.student_hidden_layers,
                attention_layers=needs.student_attention_layers,
                logits=True,
            )
            out = self.method(batch, student_view, teacher_view) if self.uses_teacher else {}
            if "ce" not in out:  # a method may compute it with its own logit term in one pass (losses/base.py)
                out["ce"] = causal_lm_ce(student_view.logits, batch.student.labels)
        return out

    def _alpha(self, out: dict[str, torch.Tensor]) -> float:
        """The CE share of this micro-batch's loss: `alpha`, or with balance=gradmag the one that gives CE and
        distillation equal gradient norms on the student's last block (`weighting.gradmag_alpha`). Under DDP each
        process balances its own micro-batch (a local norm; tokenkit's is of the global batch). Methods without a
        distillation term never get here with gradmag (`validation.check_combinations` refuses it)."""
        if self.cfg.balance != "gradmag":
            return self.cfg.alpha
        if self._balance_params is None:  # the student's own parameters (after LoRA and placement: the same objects)
            self._balance_params = last_block_parameters(self.accelerator.unwrap_model(self.student))
        alpha = gradmag_alpha(out["ce"], out["distill"], self._balance_params)
        return self.cfg.alpha if alpha is None else alpha

    def _weights(self, batch: PairedBatch, counts: tuple[torch.Tensor, torch.Tensor],
                 ce_scale: float, alpha: float) -> MicroBatchWeights:
        """This micro-batch's weights in the step (weighting.py): its share of the global counts, alpha, the world
        size."""
        tokens = next_token_targets(batch.student.labels)[0].sum().float()
        samples = torch.tensor(float(batch.batch_size), device=self.accelerator.device)
        return micro_batch_weights(
            tokens, samples, *counts, normalize_by=self.needs.normalize_by, alpha=alpha,
            distills=self.uses_teacher, ce_scale=ce_scale, world_size=self.accelerator.num_processes,
        )

    @contextlib.contextmanager
    def _sync_gradients_if(self, last: bool):
        """A block in which backward all-reduces gradients only on the `last` micro-batch of a step (DDP's `no_sync`
        on the student and on the method's own module, which accelerate wraps separately)."""
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(self.accelerator.no_sync(self.student))
                stack.enter_context(self.accelerator.no_sync(self.method))
            yield

    def train_step(self, group: list[PairedBatch], ce_scales: list[float] | None = None) -> dict[str, float]:
        """One optimiser step over `grad_accum` micro-batches; returns the global-batch metrics. `ce_scales`: a factor
        on each micro-batch's CE term in the loss (on-policy batches: 0 unless on_policy.ce_on_generated)."""
        cfg, acc = self.cfg, self.accelerator
        counts = self._global_counts(group)
        totals: dict[str, torch.Tensor] = {}
        finite = True
        for index, batch in enumerate(group):
            with self._sync_gradients_if(index == len(group) - 1):
                out = self._forward(batch)
                alpha = self._alpha(out)
                weights = self._weights(batch, counts, 1.0 if ce_scales is None else ce_scales[index], alpha)
                if cfg.balance == "gradmag":  # logged: the mean over micro-batches
                    totals["alpha"] = totals.get("alpha", 0.0) + alpha / (len(group) * acc.num_processes)
                loss = weights.loss(out["ce"], out.get("distill"))
                finite = finite and bool(torch.isfinite(loss))
                acc.backward(loss * weights.backward_scale)
                totals["loss"] = totals.get("loss", 0.0) + loss.detach()
                for name, value in out.items():
                    totals[name] = totals.get(name, 0.0) + value.detach().float() * weights.share(name)
        names = sorted(totals)
        reduced = acc.reduce(torch.stack([torch.as_tensor(totals[n], device=acc.device) for n in names]), "sum")
        metrics = {n: float(v) for n, v in zip(names, reduced)}
        finite = finite and math.isfinite(metrics["loss"])
        finite_all = finite_on_every_process(acc, finite)
        if finite_all and cfg.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            metrics["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
            # A finite loss can still give inf/NaN gradients; the norm is of the all-reduced gradients, so every
            # process takes the same decision.
            finite_all = math.isfinite(metrics["grad_norm"])
        if finite_all:
            self.optimizer.step()
            self.scheduler.step()
            self.state.consecutive_bad_steps = 0
        else:
            self.state.consecutive_bad_steps += 1
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        metrics["skipped"] = not finite_all
        return metrics

    # ----------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """accelerate state (student, method modules, optimiser, scheduler, RNG) + position + config, atomically."""
        acc = self.accelerator
        tmp, final = checkpoint_folders(self.output_dir, self.state.step, acc.is_main_process)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            (tmp / TRAINER_STATE_NAME).write_text(json.dumps(self.state.__dict__, indent=1))
            save_config(self.cfg, tmp / "config.yaml")
            write_fingerprint(tmp, self.cfg, acc.num_processes)
            write_manifest(tmp)  # last: it marks the checkpoint complete (run_files.py)
            publish_checkpoint(tmp, final, self.cfg.keep_last)
        acc.wait_for_everyone()
        return final

    def resume(self) -> bool:
        """Load the newest intact checkpoint found when the run claimed its folder; one that does not load is named
        in a warning and the previous one is tried. False when there is none (a fresh run)."""
        acc = self.accelerator
        for index, (_, path) in enumerate(self.claim.checkpoints):
            problem = verify_manifest(path) if index else None  # the newest was verified by the claim
            if problem is None:
                try:
                    if index:
                        check_resume_settings(path, self.cfg, acc.num_processes, acc.is_main_process)
                    acc.load_state(str(path))
                    self.state = TrainState(**json.loads((path / TRAINER_STATE_NAME).read_text()))
                    if acc.is_main_process:
                        print(f"resumed from {path} (step {self.state.step})", flush=True)
                    return True
                except RunFolderError:
                    raise
                except Exception as exc:  # noqa: BLE001 -- any failure to load means: try the previous checkpoint
                    problem = f"it does not load ({type(exc).__name__}: {exc})"
            if acc.is_main_process:
                print(skipped_checkpoint_warning(path, problem), file=sys.stderr, flush=True)
        if self.claim.checkpoints:
            raise RunFolderError(f"resume=true: no checkpoint in {self.output_dir / 'checkpoints'} could be loaded "
                                 f"(see the warnings above); start over with overwrite=true")
        return False

    def save_student(self, target: Path) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.student)
        # An FSDP student's full weights are gathered by every process together (a collective), then written once.
        state_dict = acc.get_state_dict(self.student) if self.student_fsdp else None
        peft_model = model if self.cfg.lora.enabled else None
        if self.cfg.lora.enabled and self.cfg.lora.merge_on_save:
            # Merge a copy: training (and later best/ saves) go on with the adapters in place.
            model = copy.deepcopy(model).merge_and_unload()
        if acc.is_main_process:
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            self.student_tokenizer.save_pretrained(tmp)
            best = target.name == "best"
            write_hub_files(tmp, self.cfg, model=model, peft_model=peft_model, tokenizer=self.student_tokenizer,
                            output_dir=self.output_dir, kind="best" if best else "final", step=self.state.step,
                            world_size=acc.num_processes, dev_rouge=self.state.best_dev_rouge if best else None)
            replace_dir(tmp, target)
        acc.wait_for_everyone()

    @contextlib.contextmanager
    def _in_eval_mode(self, which: str):
        """(model, tokenizer) of the student (unwrapped) or the teacher, in eval mode for the block."""
        if which == "teacher":
            if self.teacher is None:
                raise ValueError(f"method {self.cfg.method!r} loads no teacher")
            model, tokenizer = self.teacher, self.teacher_tokenizer
        else:
            model, tokenizer = self.accelerator.unwrap_model(self.student), self.student_tokenizer
        was_training = model.training
        model.eval()
        try:
            yield model, tokenizer
        finally:
            model.train(was_training)

    def answer(self, prompt: str, max_new_tokens: int = 48, which: str = "student") -> str:
        """The student's (or the teacher's) greedy answer to one prompt with the evaluation's decoding rules
        (no-repeat-ngram 6), as the demo shows before and after training."""
        with self._in_eval_mode(which) as (model, tokenizer):
            return generate(model, tokenizer, [prompt], seed=self.cfg.seed, do_sample=False,
                            max_new_tokens=max_new_tokens)[0]

    def evaluate_dev(self) -> float:
        """Training-time dev ROUGE-L: the first `eval_examples` dev records, one run at the training seed."""
        return self.dev_scores(self.dev_records[: self.cfg.eval_examples], [self.cfg.seed])[0]

    def dev_scores(self, records: list, seeds: list[int], which: str = "student") -> list[float]:
        """Dev ROUGE-L x100 of the student or the teacher, one value per sampling seed (the demo's before / after /
        teacher comparison)."""
        with self._in_eval_mode(which) as (model, tokenizer):
            return [dev_rouge(model, tokenizer, records, seed=seed, batch_size=self.cfg.batch_size,
                              max_new_tokens=self.cfg.eval_max_new_tokens) for seed in seeds]

    # ----------------------------------------------------------------------------------------------------------
    def train(self) -> RunResult:
        """Run to `total_steps` (or resume and finish). SIGINT / SIGTERM finish the current step, save a checkpoint
        and raise `RunStopped`; the output_dir lock is released however the run ends."""
        self.stop_signals = StopSignals()
        self.stop_signals.install()
        try:
            return self._train()
        finally:
            self.stop_signals.restore()
            self.close()

    def _stop_requested(self) -> int | None:
        """The signal that asks this run to stop, agreed by all processes (any one of them received it)."""
        signum = self.stop_signals.signum or 0
        if self.accelerator.num_processes > 1:
            signum = int(self.accelerator.reduce(torch.tensor(signum, device=self.accelerator.device), "max"))
        return signum or None

    def _stop_and_save(self, signum: int, saved_now: bool) -> None:
        checkpoint = (self.output_dir / "checkpoints" / f"step-{self.state.step}" if saved_now
                      else self.save_checkpoint())
        if self.accelerator.is_main_process:
            print(f"\nStopped after step {self.state.step} of {self.total_steps}; checkpoint saved in {checkpoint}.\n"
                  f"Continue with: {resume_command(self.cfg)}", flush=True)
        raise RunStopped(signum, checkpoint, self.state.step)

    def _train(self) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        out = self.output_dir
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        # Every process pairs the records (same work, same result), so pairing errors stop all of them here.
        data_report, summary = self.data_report_and_summary()
        if acc.is_main_process:
            (out / "data_report.json").write_text(json.dumps(data_report, indent=1))
            print(summary + f" Saved in {out / 'data_report.json'}.", flush=True)
        resumed = cfg.resume and self.resume()
        start_trackers(acc, cfg, resumed_step=self.state.step if resumed else 0)
        metrics_path = out / METRICS_NAME
        if acc.is_main_process and not resumed and metrics_path.exists():
            metrics_path.unlink()
        if resumed and acc.is_main_process and metrics_path.exists():
            keep_metric_rows_until(metrics_path, self.state.step)
        self.dev_records = None
        if cfg.eval_every and cfg.dev_data:
            self.dev_records = load_records(cfg.dev_data, limit=cfg.eval_examples)
        self.student.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not (cfg.progress and acc.is_main_process),
                   desc=f"distill[{cfg.method}]", dynamic_ncols=True, file=sys.stderr)
        last: dict = {}
        batches = self._micro_batches()
        while self.state.step < self.total_steps:
            started = time.perf_counter()
            group = next(batches)
            ce_scales, policy_metrics = None, {}
            if self.on_policy is not None:  # the student answers this step's prompts itself (step chosen by seed)
                group, ce_scales, policy_metrics = self.on_policy.prepare(
                    group, self.state.step, acc.unwrap_model(self.student))
            lrs = self.scheduler.get_last_lr()  # the rates this step uses
            metrics = self.train_step(group, ce_scales)
            self.state.step += 1
            elapsed = time.perf_counter() - started
            tokens = sum(int(b.student.attention_mask.sum()) for b in group) * acc.num_processes
            row = {
                "step": self.state.step, "epoch": self.state.epoch, **metrics,
                "lr": lrs[0], "projector_lr": lrs[-1],
                "tokens_per_s": tokens / max(elapsed, 1e-9), "step_s": elapsed, "world_size": acc.num_processes,
                **policy_metrics,
            }
            if metrics["skipped"]:
                self._bad_step(row, metrics_path)
            if cfg.eval_every and self.dev_records and self.state.step % cfg.eval_every == 0:
                row["dev_rouge_l"] = self.evaluate_dev()
                if self.state.best_dev_rouge is None or row["dev_rouge_l"] > self.state.best_dev_rouge:
                    self.state.best_dev_rouge, self.state.best_step = row["dev_rouge_l"], self.state.step
                    self.save_student(out / "best")
            if metrics["skipped"] or self.state.step % cfg.log_every == 0 or self.state.step == self.total_steps:
                self._log(row, metrics_path)
            last = row
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            saved_now = bool(cfg.save_every) and self.state.step % cfg.save_every == 0
            if saved_now:
                self.save_checkpoint()
            if self.state.step < self.total_steps and (signum := self._stop_requested()) is not None:
                self._stop_and_save(signum, saved_now)
        bar.close()
        final = out / "final"
        self.save_student(final)
        plot = None
        if acc.is_main_process:
            plot = plot_loss_curves(metrics_path, out / "loss_curves.png")
        best = out / "best" if (out / "best").exists() else None
        finish_trackers(acc)
        return RunResult(out, final, metrics_path, self.state.step, last, best, plot)

    def data_report_and_summary(self) -> tuple[dict, str]:
        """The loading report plus truncation counts over the records this run trains on (the first ones of epoch
        0's order, or all of them when the run covers an epoch: cheap for short runs of large files), and a
        one-paragraph summary. Pairs those records once, so pairing errors surface before the first step."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum * self.accelerator.num_processes
        used = min(len(self.dataset), self.total_steps * per_step)
        records = [self.dataset.records[i] for i in self._epoch_order(0)[:used]]
        counts = count_truncation(
            records, self.student_tokenizer, self.teacher_tokenizer, cfg.max_length, cfg.max_prompt_length
        )
        policy = (f"each side's prompt keeps its last {cfg.max_prompt_length} tokens (BOS kept in front), then the "
                  f"response is cut so prompt + response + EOS fit {cfg.max_length} tokens (a cut response loses EOS)")
        report = {
            **dataclasses.asdict(self.data_report),
            "truncation": {**dataclasses.asdict(counts), "max_length": cfg.max_length,
                           "max_prompt_length": cfg.max_prompt_length, "policy": policy},
        }
        summary = (f"Data: {self.data_report.summary()}. Truncation policy: {policy}; "
                   f"{counts.summary(over=f'the {used} records this run uses')}.")
        return report, summary

    def _bad_step(self, row: dict, metrics_path: Path) -> None:
        """A skipped step: warn; after `max_bad_steps` in a row, save the (still last good) state and stop."""
        cfg, state = self.cfg, self.state
        if self.accelerator.is_main_process:
            tqdm.write(f"step {state.step}: non-finite loss or gradients (loss={row['loss']:.4g}); update skipped, "
                       f"{state.consecutive_bad_steps} in a row (max_bad_steps={cfg.max_bad_steps})", file=sys.stderr)
        if state.consecutive_bad_steps < cfg.max_bad_steps:
            return
        self._log(row, metrics_path)
        state.consecutive_bad_steps = 0  # a resumed run (say with a lower lr) starts counting afresh
        checkpoint = self.save_checkpoint()  # skipped steps never touched the weights or the optimiser
        raise FloatingPointError(
            f"{cfg.max_bad_steps} consecutive steps had a non-finite loss or gradients (last at step {state.step}); "
            f"stopping. The last good state is saved in {checkpoint}; lower lr or check the data, then continue "
            f"with resume=true."
        )

    def _log(self, row: dict, path: Path) -> None:
        if self.accelerator.is_main_process:
            append_metric_row(path, row)
            log_row(self.accelerator, row)

"""The paper's protocol, step 0: fine-tune the teacher on the training data before distilling from it.

The SRA paper (like DSKD and MiniLLM before it) distils from teachers already fine-tuned on Dolly
(`Qwen1.5_1.8B_SFT_Dolly`, `Mistral7B_Dolly_SFT`, ...). A raw instruct teacher can score below the students it
teaches, which then learn the task from the CE on references rather than from the teacher, and a ranking of methods
measured that way says little. This step is plain SFT of the teacher on its own tokenizer, the same as

    sra distill method=sft student=TEACHER student_tokenizer=TEACHER_TOKENIZER lora.enabled=false \\
        max_steps=160 lr=5e-5 warmup_steps=16 output_dir=...

with the base settings' training data, batch size and sequence length. `tuned_teacher` runs it once per teacher,
data and tuning settings into the cache folder (`$SRA_CACHE/tuned-teachers/`), resumes an interrupted build from
its checkpoints, holds a lock so two comparisons started together build it once, and returns the folder
`teacher=` then points at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

# The teacher cache and the engine (accelerate, model loading) are imported where used: `sra compare` reads
# `TeacherTuning` from here before any model work.
from sra_distill.config import Config, config_to_dict, load_config
from sra_distill.errors import ConfigError
from sra_distill.paths import build_lock, cache_dir

_FORMAT = 1  # bump when the tuning recipe changes, so tuned teachers are rebuilt


@dataclass(frozen=True)
class TeacherTuning:
    """How the teacher is tuned: SFT on the base settings' training data, batch size and max_length."""

    steps: int = 160
    lr: float = 5e-5
    warmup_steps: int = 16
    seed: int = 42


def tuning_overrides(base: Config, tuning: TeacherTuning, output_dir: Path) -> dict:
    """The settings of the tuning run: the base's data, batch and length; the teacher in the student's place."""
    return dict(
        method="sft", student=base.teacher, student_tokenizer=base.teacher_tokenizer,
        student_arch=config_to_dict(base.teacher_arch), student_layers=None, teacher_adapter=None,
        lora=dict(config_to_dict(base.lora), enabled=False), max_steps=tuning.steps, lr=tuning.lr,
        warmup_steps=tuning.warmup_steps, seed=tuning.seed, output_dir=str(output_dir), resume=True, overwrite=False,
        save_every=max(1, tuning.steps // 4), keep_last=1, eval_every=0, teacher_cache=None, demo_prompt=None,
        demo_eval_seeds=None, on_policy=dict(config_to_dict(base.on_policy), ratio=0.0),
    )


def tuned_teacher_key(base: Config, tuning: TeacherTuning) -> str:
    """Folder name: the teacher's name, then a hash of everything the tuned weights depend on (the teacher's files
    as the teacher cache fingerprints them, so a changed model folder is tuned again)."""
    from sra_distill.train.teacher_cache import data_fingerprint, teacher_fingerprint  # see the imports

    # The data by its content, not its path's mtime: a data folder copied or mounted anew (a fresh machine) keeps
    # its tuned teacher, and an edited file gets a new one.
    fields = dict(
        format=_FORMAT, teacher=base.teacher, teacher_files=teacher_fingerprint(base),
        teacher_tokenizer=base.teacher_tokenizer,
        teacher_arch=config_to_dict(base.teacher_arch), train_data=data_fingerprint(base.train_data),
        batch_size=base.batch_size,
        grad_accum=base.grad_accum, max_length=base.max_length, max_prompt_length=base.max_prompt_length,
        max_train_examples=base.max_train_examples, epochs=base.epochs, precision=base.precision,
        tuning=dataclasses.asdict(tuning), optimizer=[base.weight_decay, base.max_grad_norm, base.min_lr_ratio],
    )
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(base.teacher).name or base.teacher).strip("-")[:40]
    return f"{name}-{digest}"


def tuned_teacher(base: Config, tuning: TeacherTuning = TeacherTuning(), progress: bool = True) -> Path:
    """The folder of `base.teacher` fine-tuned on `base.train_data` (built on first use, then read from the cache).

    Returns a `save_pretrained` folder holding the model and its tokenizer."""
    from sra_distill.train.engine import Trainer  # see the imports

    if base.teacher_adapter:  # the tuning run trains the teacher's own weights; an adapter would be dropped
        raise ConfigError(f"a teacher with an adapter ({base.teacher_adapter}) is not tuned here: merge the adapter "
                          f"into a model folder and name that as the teacher, or use --teacher raw")
    folder = cache_dir() / "tuned-teachers" / tuned_teacher_key(base, tuning)
    done = folder / "tuned.json"
    if done.is_file():
        return folder / "final"
    with build_lock(folder):  # another process building the same teacher: wait, then read its result
        if done.is_file():
            return folder / "final"
        print(f"[tune-teacher] fine-tuning {base.teacher} on {base.train_data}: {tuning.steps} steps x batch "
              f"{base.batch_size} x {base.max_length} tokens, lr {tuning.lr} (once; cached in {folder})", flush=True)
        tree = _merge(config_to_dict(base), tuning_overrides(base, tuning, folder))
        tree["progress"] = progress
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flatten(tree).items()])
        result = Trainer(cfg).train()
        done.write_text(json.dumps(dict(teacher=base.teacher, train_data=base.train_data,
                                        tuning=dataclasses.asdict(tuning), steps=result.steps,
                                        last_metrics=result.last_metrics), indent=1) + "\n")
    return folder / "final"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    out.update(extra)
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: overrides `load_config` reads back exactly."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

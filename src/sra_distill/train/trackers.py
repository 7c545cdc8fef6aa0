"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, ...) through accelerate's tracker classes.

`report_to` names trackers as accelerate does (`tensorboard`, `wandb`, `mlflow`, `comet_ml`, `aim`, `clearml`,
`dvclive`, `swanlab`, `trackio`, or `all` for every one installed); `run_name` names the run (default: the
output folder's name). Every row the engine writes to `metrics.jsonl` is logged at its step, dev ROUGE-L
included, and the resolved config is stored as the run's hyper-parameters (flattened to dotted keys).

accelerate itself skips a tracker whose package is missing with only a debug message; here a missing package is an
error naming the package, raised before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import accelerate.utils
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

from sra_distill.config import Config, ConfigError, config_to_dict

PROJECT = "sra-distill"  # project / experiment name in the trackers that group runs by project

# accelerate's tracker name -> the package to install for it (pip name).
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def _installed(name: str) -> bool:
    # accelerate's own test, looked up at call time (its module-level list is frozen at import); accelerate has one
    # for some trackers only.
    check = getattr(accelerate.utils, f"is_{name}_available", None)
    return True if check is None else bool(check())


def tracker_names(report_to: list[str]) -> list[str]:
    """The trackers `report_to` asks for, checked: known to accelerate and installed (`all` = every installed one).

    Raises ConfigError naming the package to install for a missing one.
    """
    names: list[str] = []
    for index, raw in enumerate(report_to):
        name = str(raw).strip().lower()
        if name == "all":
            names += [n for n in TRACKER_PACKAGES if _installed(n)]
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"report_to[{index}]: unknown tracker {raw!r}; accelerate supports: "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (or all)")
        if name in TRACKER_PACKAGES and not _installed(name):
            raise ConfigError(f"report_to[{index}]: the {name} tracker needs the {TRACKER_PACKAGES[name]!r} package, "
                              f"which is not installed; install it with `pip install {TRACKER_PACKAGES[name]}` "
                              f"or remove {name!r} from report_to")
        names.append(name)
    return list(dict.fromkeys(names))


def default_run_name(cfg: Config) -> str:
    return cfg.run_name or Path(cfg.output_dir).resolve().name


def build_trackers(cfg: Config) -> list[GeneralTracker]:
    """Tracker objects for `cfg.report_to` (checked; nothing is imported or started yet). File-based trackers write
    under `output_dir` (TensorBoard: `output_dir/tensorboard/<run_name>/`)."""
    names = tracker_names(cfg.report_to)
    run = default_run_name(cfg)
    out = Path(cfg.output_dir)
    trackers = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS[name]
        # The positional argument accelerate passes is the run's name for some trackers and the project for others.
        if name == "tensorboard":
            tracker = cls(run, str(out / "tensorboard"))
        elif name == "aim":
            tracker = cls(run, str(out / "aim"))
        elif name == "mlflow":
            tracker = cls(experiment_name=PROJECT, run_name=run)
        elif name in ("wandb", "trackio"):
            tracker = cls(PROJECT, name=run)
        elif name == "swanlab":
            tracker = cls(PROJECT, experiment_name=run)
        elif name == "clearml":
            tracker = cls(PROJECT, task_name=run)
        elif cls.requires_logging_directory:  # comet_ml, dvclive and registered custom trackers: accelerate's default
            tracker = cls(PROJECT, str(out / name))
        else:
            tracker = cls(PROJECT)
        trackers.append(tracker)
    return trackers


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """The resolved config as one level of `section.key` -> bool/int/float/str/None (lists as JSON text), the
    value types every tracker accepts as hyper-parameters."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif node is None or isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:
            flat[prefix] = json.dumps(node)

    walk(config_to_dict(cfg), "")
    return flat


def metric_scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row as floats (booleans as 0/1); `step` is the x-axis, not a scalar."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (bool, int, float))}


def start_trackers(accelerator, cfg: Config, resumed_step: int = 0) -> None:
    """Start the trackers the accelerator was built with and store the hyper-parameters. A resumed run continues the
    same TensorBoard run and first drops the events logged after the checkpoint (`purge_step`)."""
    if not accelerator.log_with:
        return
    for tracker in accelerator.log_with:
        # accelerate lists a tracker it has not built as its name; a registered custom one as a plain str (no `name`).
        if resumed_step and getattr(tracker, "name", None) == "tensorboard":
            tracker.init_kwargs.setdefault("purge_step", resumed_step + 1)
    accelerator.init_trackers(PROJECT, config=flat_hparams(cfg))


def log_row(accelerator, row: dict) -> None:
    if accelerator.trackers:
        accelerator.log(metric_scalars(row), step=int(row["step"]))


def finish_trackers(accelerator) -> None:
    """Close the trackers (flush and end their runs). Not `Accelerator.end_training`, which also tears down the
    process group that a multi-process caller may still use after `train()`."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()

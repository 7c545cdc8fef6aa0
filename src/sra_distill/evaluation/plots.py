"""Loss-curve (and dev-score) plots from `metrics.jsonl`, as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from sra_distill.run_files import read_metric_rows  # noqa: E402

NOT_CURVES = {"step", "epoch", "lr", "projector_lr", "tokens_per_s", "step_s", "world_size", "grad_norm", "skipped",
              "dev_rouge_l", "on_policy", "generation_s", "generated_tokens", "degenerate", "degenerate_eos_only",
              "degenerate_empty", "degenerate_no_spans", "on_policy_fallback_batches"}


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """One panel of every loss component over steps, plus dev ROUGE-L when it was measured."""
    rows = read_metric_rows(metrics_path)
    if not rows:
        return None
    names = sorted({k for r in rows for k, v in r.items() if k not in NOT_CURVES and isinstance(v, (int, float))})
    dev = [(r["step"], r["dev_rouge_l"]) for r in rows if "dev_rouge_l" in r]
    panels = 2 if dev else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for name in names:
        points = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.5 if name == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.legend(fontsize=8)
    ax.set_title("training losses")
    if dev:
        ax = axes[0][1]
        ax.plot([d[0] for d in dev], [d[1] for d in dev], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("ROUGE-L")
        ax.set_title("dev ROUGE-L")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path

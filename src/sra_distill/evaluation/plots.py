"""Loss-curve (and dev-score) plots from `metrics.jsonl`, as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sra_distill.run_files import read_metric_rows  # noqa: E402

NOT_CURVES = {"step", "epoch", "lr", "projector_lr", "tokens_per_s", "step_s", "world_size", "grad_norm", "skipped",
              "dev_rouge_l", "on_policy", "generation_s", "generated_tokens", "degenerate", "degenerate_eos_only",
              "degenerate_empty", "degenerate_no_spans", "on_policy_fallback_batches"}


def loss_figure(rows: list[dict]) -> Figure:
    """One panel of every loss component over steps, plus dev ROUGE-L when it was measured. The legend sits to
    the right of the loss panel, never over a curve; steps are whole numbers, so are the step ticks."""
    names = sorted({k for r in rows for k, v in r.items() if k not in NOT_CURVES and isinstance(v, (int, float))})
    dev = [(r["step"], r["dev_rouge_l"]) for r in rows if "dev_rouge_l" in r]
    panels = 2 if dev else 1
    # Shared steps: a dev score measured once still sits on the training's step axis.
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1.5, 4), squeeze=False, sharex=True,
                             layout="constrained")
    ax = axes[0][0]
    for name in names:
        points = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.5 if name == "loss" else 1)
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_title("training losses")
    # To the right of its panel (constrained layout makes room), beside the curves it names, never over them.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
    if dev:
        ax = axes[0][1]
        ax.plot([d[0] for d in dev], [d[1] for d in dev], marker="o")
        ax.set_ylabel("ROUGE-L")
        ax.set_title("dev ROUGE-L")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = [r["step"] for r in rows]
    if min(steps) == max(steps):  # one step: widen the axis, or the integer locator finds no whole number on it
        axes[0][0].set_xlim(steps[0] - 1, steps[0] + 1)
    return fig


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """`loss_figure` of a metrics.jsonl as a PNG (None when the file has no rows)."""
    rows = read_metric_rows(metrics_path)
    if not rows:
        return None
    fig = loss_figure(rows)
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path

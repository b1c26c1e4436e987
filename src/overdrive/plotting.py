"""``overdrive plot RUN_DIR...``: loss, learning rate, tokens/s and memory against the
optimizer step, read from each run's ``metrics.jsonl``, the runs overlaid.

matplotlib is an extra (``pip install 'overdrive[plot]'``); the figure is drawn with the
Agg canvas directly, so no pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BackendUnavailable, OverdriveError

# (metric key, axis title); memory falls back to the peak where nothing was allocated
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"),
          ("memory", "memory (GB)"))


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (a path to the file itself works too)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise OverdriveError(f"overdrive plot: {run_dir} has no metrics.jsonl; give run "
                             "directories written by trackers=('jsonl', ...)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(path.read_text(encoding="utf-8").splitlines()):
                break  # a last line cut short by a crash
            raise OverdriveError(f"overdrive plot: {path} line {n} is not JSON") from None
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; "memory" is allocated memory, else the peak."""
    if key == "memory":
        have = any("memory_allocated_gb" in r for r in rows)
        key = "memory_allocated_gb" if have else "memory_peak_gb"
    points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[str | Path], out: str | Path = "plot.png",
              labels: list[str] | None = None) -> Path:
    """Draw the four panels for every run into ``out`` (PNG, or any format matplotlib
    knows from the suffix); returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BackendUnavailable("overdrive plot needs matplotlib: "
                                 "pip install 'overdrive[plot]'") from None
    if not run_dirs:
        raise OverdriveError("overdrive plot: give at least one run directory")
    if labels and len(labels) != len(run_dirs):
        raise OverdriveError(f"overdrive plot: {len(labels)} --label(s) for {len(run_dirs)} "
                             "run(s); give one label per run, or none")
    runs = [(labels[i] if labels else Path(d).name or str(d), read_rows(d))
            for i, d in enumerate(run_dirs)]
    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for label, rows in runs:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, label=label, linewidth=1.4)
        if key == "memory":  # accelerator memory, or a CPU run's peak resident memory
            cpu_only = not any("memory_allocated_gb" in r for _, rows in runs for r in rows)
            title = "peak resident memory (GB)" if cpu_only else "memory allocated (GB)"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key in ("loss",) and _positive(ax):
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _positive(ax) -> bool:
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20

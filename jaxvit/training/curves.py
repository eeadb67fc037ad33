"""Training curves: ``metrics.jsonl`` of a workdir -> one PNG of loss, accuracy and learning rate."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (panel title, [(metrics key, legend label)])
CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("train/loss", "train"), ("eval/loss", "eval"))),
    ("accuracy", (("train/accuracy", "train"), ("eval/top1", "eval top-1"), ("eval/top5", "eval top-5"))),
    ("learning rate", (("learning_rate", "learning rate"),)),
)
CURVES_FIGSIZE = (12.0, 3.6)  # inches
CURVES_DPI = 100


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``: one dict per line, in file order.

    Blank lines are skipped, and so is a cut-off last line (a run killed
    mid-write); a bad line elsewhere raises ``ValueError`` with its number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: expected a metrics.jsonl written by train.py")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def metric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key`` over the records that have both ``step`` and a number for ``key``."""
    pairs = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int | float)
    ]
    steps = np.array([p[0] for p in pairs], np.float64)
    values = np.array([p[1] for p in pairs], np.float64)
    return steps, values


def curves_figure(records: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Any:
    """A matplotlib ``Figure`` of loss, accuracy and learning rate against step.

    Each panel draws the keys of ``CURVE_PANELS`` that the records hold;
    ``ValueError`` if none of them has any value. The figure is
    ``CURVES_FIGSIZE * CURVES_DPI`` pixels.
    """
    from matplotlib import ticker
    from matplotlib.figure import Figure

    series = {key: metric_series(records, key) for _, keys in CURVE_PANELS for key, _ in keys}
    if not any(len(steps) for steps, _ in series.values()):
        wanted = [key for _, keys in CURVE_PANELS for key, _ in keys]
        raise ValueError(f"the metrics hold none of {wanted} with a 'step'")
    figure = Figure(figsize=CURVES_FIGSIZE, dpi=CURVES_DPI, layout="constrained")
    axes = figure.subplots(1, len(CURVE_PANELS))
    for ax, (panel, keys) in zip(axes, CURVE_PANELS, strict=True):
        drawn = False
        for key, label in keys:
            steps, values = series[key]
            if len(steps):
                # Eval points are sparse: mark them so a single one is visible.
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
                drawn = True
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn and len(keys) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif panel == "loss" and min(v.min() for s, v in (series[k] for k, _ in keys) if len(s)) > 0:
            ax.set_yscale("log")
            # Plain 0.2, 0.5, 1, 2 read better than 5x10^-1 on a log axis spanning a decade or two.
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if title:
        figure.suptitle(title)
    return figure


def plot_curves(metrics_path: str | Path, out_path: str | Path, *, title: str | None = None) -> Path:
    """Reads ``metrics_path`` (a ``metrics.jsonl`` or a workdir holding one), writes the curves PNG to ``out_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    metrics_path = Path(metrics_path)
    if metrics_path.is_dir():
        metrics_path = metrics_path / "metrics.jsonl"
    figure = curves_figure(read_metrics(metrics_path), title=title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(out_path))
    return out_path

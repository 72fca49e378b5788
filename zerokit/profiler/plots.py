"""A rank's memory timeline as a PNG: memory readings over phase bands, and memory by category.

Drawn on a matplotlib Figure with the Agg canvas directly, so the training process's own
matplotlib backend (if any) is left alone.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

GiB = 2**30
PHASE_COLORS = {
    "forward": "#cfe8ff",
    "backward": "#ffe2c6",
    "step": "#d9f2d0",
    "communication": "#ead7f5",
    "offload": "#f5d7d7",
}
LINES = (
    ("cuda_allocated", "allocated (PyTorch)"),
    ("cuda_reserved", "reserved (PyTorch)"),
    ("outside_allocator", "outside PyTorch (NVML: context, NCCL)"),
    ("host_rss", "host RSS"),
    ("host_pinned", "host pinned"),
)
CATEGORIES = (("model_states", "model states"), ("activations", "activations"), ("other", "other"))


def plot_rank(summary: dict, path: Path) -> Path:
    samples = summary["samples"]
    times = samples["t"]
    figure = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(figure)
    readings, categories = figure.subplots(2, 1, sharex=True)

    for axes in (readings, categories):
        _phase_bands(axes, summary["phases"])
    for key, label in LINES:
        values = samples[key]
        if any(v is not None for v in values):
            readings.plot(times, [None if v is None else v / GiB for v in values], label=label, linewidth=1.2)
    readings.set_ylabel("GiB")
    readings.set_title(
        f"rank {summary['rank']} on {summary['device']} ({summary['outcome']}): memory readings, "
        f"every {summary['interval_ms']:.0f} ms"
    )
    phase_legend = [Patch(color=c, label=name) for name, c in PHASE_COLORS.items()
                    if any(p["name"] == name for p in summary["phases"])]  # fmt: skip
    readings.legend(handles=readings.get_legend_handles_labels()[0] + phase_legend, loc="upper left", fontsize=8)

    stacked = [[v / GiB for v in samples[key]] for key, _ in CATEGORIES]
    categories.stackplot(times, *stacked, labels=[label for _, label in CATEGORIES], alpha=0.85)
    source = "PyTorch allocated" if summary["memory_source"] == "cuda_allocated" else "host RSS"
    categories.set_title(f"{source} by category")
    categories.set_ylabel("GiB")
    categories.set_xlabel("seconds since start")
    categories.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def _phase_bands(axes, phases: list[dict]) -> None:
    for span in phases:
        if span["depth"] == 0 or span["name"] in ("communication", "offload"):
            axes.axvspan(span["start"], span["end"], color=PHASE_COLORS.get(span["name"], "#eeeeee"), linewidth=0)

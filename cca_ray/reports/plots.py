"""Matplotlib on the Agg canvas (no pyplot, no display) for every report's figures."""

from __future__ import annotations

from pathlib import Path

from cca_ray.io import atomic_write


def figure(width: float = 7.0, height: float = 4.5):
    """A matplotlib Figure on the Agg canvas: no pyplot, no display, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> None:
    """Save a figure as PNG atomically (temp file + rename), through cca_ray.io."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"), binary=True)


def log_axis(ax, which: str, values: list[float], at_values: bool) -> None:
    """Log scale with plain labels ('0.01', not overlapping minor labels): ticks at the values
    themselves if asked and there are few (a search grid), else at 1, 2 and 5 times the decades."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    ticks = sorted(set(values))
    few = at_values and len(ticks) <= 8
    axis.set_major_locator(FixedLocator(ticks) if few else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())

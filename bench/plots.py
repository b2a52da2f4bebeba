"""PNG plots for the benchmark reports: latency CDFs and goodput against request rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def cdf(series: dict[str, list[float]], title: str, xlabel: str, path: Path) -> Path:
    """One CDF line per configuration; values in seconds, drawn in milliseconds."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ordered = sorted(1000 * v for v in values)
        if ordered:
            axes.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=name)
    axes.set(title=title, xlabel=xlabel, ylabel="fraction of samples", ylim=(0, 1.01))
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def goodput(rates: list[float], by_config: dict[str, list[float]], title: str, path: Path) -> Path:
    """Goodput (requests/s meeting both SLOs) at each offered rate, one line per configuration."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in by_config.items():
        axes.plot(rates, values, marker="o", label=name)
    axes.plot(rates, rates, linestyle=":", color="grey", label="offered")
    axes.set(title=title, xlabel="offered rate (requests/s)", ylabel="goodput (requests/s)")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

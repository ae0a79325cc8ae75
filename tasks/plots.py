"""Small matplotlib figures the stages log to MLflow (headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram(values: Sequence[float], path: str | Path, title: str, xlabel: str,
              threshold: float | None = None, bins: int = 50) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(list(values), bins=bins, color="#4C72B0")
    if threshold is not None:
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def bar_chart(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, len(labels) * 0.9), 4))
    bars = ax.bar(list(labels), list(values), color="#55A868")
    # Methods often differ in the third decimal: the printed value tells what the bar heights cannot.
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8, padding=2)
    ax.margins(y=0.12)
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def scatter(x: Sequence[float], y: Sequence[float], path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(list(x), list(y), s=6, alpha=0.6)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

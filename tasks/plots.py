"""Small matplotlib figures the stages log to MLflow (headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ALL_COLOR, PICKED_COLOR = "#BBBBBB", "#55A868"


def _saved(plt, fig, path: str | Path) -> Path:
    """Lay out, write and close a figure (an open figure holds its memory until the process ends)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _overlaid_hist(ax, values, picked, picked_label: str, edges) -> None:
    """All values in grey, the picked ones over them in green, on the same bin edges (so heights compare)."""
    ax.hist(values, bins=edges, color=ALL_COLOR, label=f"all ({len(values)})")
    ax.hist(picked, bins=edges, color=PICKED_COLOR, label=f"{picked_label} ({len(picked)})")


def histogram(values: Sequence[float], path: str | Path, title: str, xlabel: str,
              threshold: float | None = None, bins: int = 50, selected: Sequence[float] | None = None,
              selected_label: str = "selected") -> Path:
    """A histogram of `values`; with `selected`, those drawn over all of them (where in the distribution a
    method's picks lie); with `threshold`, a dashed line there."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = list(values)
    if selected is None:
        ax.hist(values, bins=bins, color="#4C72B0")
    else:
        _overlaid_hist(ax, values, list(selected), selected_label, np.histogram_bin_edges(values, bins))
    if threshold is not None:
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:g}")
    if threshold is not None or selected is not None:
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel="samples")
    return _saved(plt, fig, path)


def bar_chart(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, len(labels) * 0.9), 4))
    bars = ax.bar(list(labels), list(values), color="#55A868")
    # Methods often differ in the third decimal: the printed value tells what the bar heights cannot.
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=8, padding=2)
    ax.margins(y=0.12)
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=30)
    return _saved(plt, fig, path)


LOWER_IS_BETTER = ("nll", "loss", "perplexity", "lose_rate")
HIGHER_IS_BETTER = ("acc", "exact_match", "pass@", "pass_", "win_rate", "winning_score", "quality", "f1", "bleu",
                    "rouge")


def metric_direction(metric: str) -> str | None:
    """'lower' or 'higher' is better, by the metric's last name part; None where the name does not say."""
    last = metric.rsplit("/", 1)[-1].lower()
    if any(word in last for word in LOWER_IS_BETTER):
        return "lower"
    if any(last.startswith(word) or f"_{word}" in last for word in HIGHER_IS_BETTER):
        return "higher"
    return None


def best_method(methods: Sequence[tuple[str, float]], direction: str | None) -> str | None:
    """The label of the best (label, value) by `direction`; None when the direction is unknown, there is nothing to
    choose between, or the best value is shared (a highlighted tie would claim a winner)."""
    if direction is None or len(methods) < 2:
        return None
    best = (min if direction == "lower" else max)(v for _, v in methods)
    winners = [label for label, v in methods if v == best]
    return winners[0] if len(winners) == 1 else None


def comparison_chart(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str, metric: str,
                     reference: str | None = "base") -> Path:
    """Methods as dots on a shared axis that spans their values (not from zero: methods often differ in the third
    decimal), the `reference` row (the untrained base model) as a dashed line, the best method in green when the
    metric's name says which way is better."""
    plt = _pyplot()
    pairs = [(label, float(v)) for label, v in zip(labels, values)]
    base = next((v for label, v in pairs if label == reference), None)
    methods = [(label, v) for label, v in pairs if label != reference] or pairs
    direction = metric_direction(metric)
    best = best_method(methods, direction)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.42 * len(methods)))
    ys = range(len(methods))[::-1]  # first method on top
    colors = [PICKED_COLOR if label == best else "#4C72B0" for label, _ in methods]
    ax.scatter([v for _, v in methods], list(ys), color=colors, s=45, zorder=3)
    for y, (label, v) in zip(ys, methods):
        ax.annotate(f"{v:.4g}", (v, y), textcoords="offset points", xytext=(7, -3), fontsize=8)
    if base is not None:
        ax.axvline(base, color="#C44E52", linestyle="--", label=f"{reference} {base:.4g}")
        ax.legend(loc="best", fontsize=8)
    ax.set_yticks(list(ys), [label for label, _ in methods])
    ax.margins(x=0.15, y=0.12)
    ax.grid(axis="x", alpha=0.3)
    suffix = f" ({direction} is better)" if direction else ""
    ax.set(title=title + suffix, xlabel=metric)
    return _saved(plt, fig, path)


def line_chart(x: Sequence[float], y: Sequence[float], path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(x), list(y), color="#4C72B0")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)  # y not from 0: the shape is what it is drawn for
    ax.grid(alpha=0.3)
    return _saved(plt, fig, path)


def scatter(x: Sequence[float], y: Sequence[float], path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(list(x), list(y), s=6, alpha=0.6)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _saved(plt, fig, path)


def pre_experience_figure(cluster_sizes, picked_per_cluster, perplexities, picked_perplexities, path: str | Path,
                          title: str) -> Path:
    """Cherry's pre-experience pick at a glance: each cluster's size and how many it gave (largest first: a
    cluster smaller than the per-cluster count gives all it has), and the instruction perplexities of all against
    the picked (the mid-perplexity band of each cluster shows as the picked distribution's narrower spread)."""
    import numpy as np

    plt = _pyplot()
    order = np.argsort(-np.asarray(cluster_sizes), kind="stable")
    fig, (by_cluster, by_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = np.arange(len(order))
    by_cluster.bar(ranks, np.asarray(cluster_sizes)[order], width=1.0, color=ALL_COLOR, label="instructions")
    by_cluster.bar(ranks, np.asarray(picked_per_cluster)[order], width=1.0, color=PICKED_COLOR, label="picked")
    by_cluster.set(xlabel="cluster (largest first)", ylabel="instructions", title="per cluster")
    by_cluster.legend()
    values = np.asarray(perplexities, dtype=np.float64)
    finite = values[np.isfinite(values) & (values > 0)]
    # A log axis only where perplexities span decades (a real model's do; a random one's sit in a narrow range,
    # where log ticks would crowd each other).
    wide = len(finite) > 0 and finite.max() > 100 * finite.min()
    bins = np.geomspace(finite.min(), finite.max(), 40) if wide else np.histogram_bin_edges(finite, 40)
    _overlaid_hist(by_ppl, finite, np.asarray(picked_perplexities, dtype=np.float64), "picked", bins)
    if wide:
        by_ppl.set_xscale("log")
    by_ppl.set(xlabel="instruction perplexity", ylabel="instructions", title="perplexity")
    by_ppl.legend()
    fig.suptitle(title)
    return _saved(plt, fig, path)

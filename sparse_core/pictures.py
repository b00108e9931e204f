"""PNG pictures for people who would rather look than read (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def density_heatmap(
    head_density: Sequence[Sequence[float]],
    path: str | Path,
    *,
    title: str = "Fraction of causal blocks kept",
    head_label: str = "head",
) -> Path:
    """Layer x head heatmap of kept-block density (1.0 = dense)."""
    data = np.asarray(head_density, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise ValueError("head_density must be a non-empty [layers][heads] table")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(
        figsize=(max(3.5, 1.6 + 0.45 * data.shape[1]), max(2.6, 1.2 + 0.22 * data.shape[0]))
    )
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel(head_label)
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    step = max(1, data.shape[0] // 15)
    ax.set_yticks(range(0, data.shape[0], step))
    ax.set_title(f"{title}\nmean {data.mean():.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def block_mask_over_attention(
    block_mass: np.ndarray,
    kept: np.ndarray,
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Dense block attention mass (log scale) with the plan's selected blocks outlined; dropped
    causal blocks are hatched so one sees what mass the plan gave up."""
    mass = np.asarray(block_mass, dtype=float)
    keep = np.asarray(kept, dtype=bool)
    if mass.shape != keep.shape or mass.ndim != 2:
        raise ValueError("block_mass and kept must be the same [nb, nb] shape")
    n = mass.shape[0]
    causal = np.tril(np.ones((n, n), dtype=bool))
    shown = np.where(causal, np.log10(np.clip(mass, 1e-6, None)), np.nan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    im = axes[0].imshow(shown, cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
    axes[0].set_title("dense attention mass per block (log10)", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.03)
    overlay = np.where(causal, np.where(keep, 1.0, 0.0), np.nan)
    axes[1].imshow(shown, cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
    axes[1].imshow(
        np.ma.masked_where(~(causal & ~keep), overlay),
        cmap="Greys",
        vmin=0,
        vmax=1,
        alpha=0.75,
        interpolation="nearest",
    )
    dropped_mass = float((mass * (causal & ~keep)).sum(1).mean()) if n else 0.0
    density = float(keep[causal].mean()) if n else 1.0
    axes[1].set_title(
        f"selected blocks (dropped greyed)\ndensity {density:.3f}, mass dropped per row {dropped_mass:.4f}",
        fontsize=9,
    )
    for ax in axes:
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

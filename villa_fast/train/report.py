"""Training curves as a PNG and results as a plain-text table."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "plot_curves"]


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, title: str = ""
) -> str | None:
    """One panel of training loss and one of each validation metric, one line per run; returns the PNG's
    path, or None (with a warning) where matplotlib, a ``train`` extra, is not installed."""
    try:
        import matplotlib
    except ImportError:
        logging.getLogger("villa_fast.train").warning(
            "matplotlib is not installed (pip install 'villa_fast[train]'): no training curves written to %s", path
        )
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_keys = []
    for hist in runs.values():
        for e in hist:
            for k in e:
                if k.startswith("val/") and k not in val_keys and k not in ("val/n", "val/loss"):
                    val_keys.append(k)
    panels = ["loss", *val_keys[:3]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for name, hist in runs.items():
            pts = [(e["step"], e[key]) for e in hist if key in e]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if key != "loss" else None, markersize=3, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_title("training loss" if key == "loss" else key.replace("val/", "validation "))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table; floats in [0, 1] are shown as percentages."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{100 * v:.2f}" if 0.0 <= v <= 1.0 else f"{v:.4g}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    sep = "  ".join("-" * w for w in widths)
    body = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    return "\n".join([line, sep, *body])

"""matplotlib without a display, and figures saved atomically (training plots, benchmark plots)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, png: Path) -> Path:
    """Write fig to png through a temporary file, so a reader never sees half an image."""
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    pyplot().close(fig)
    tmp.replace(png)
    return png

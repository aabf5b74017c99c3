"""The one place that sets up matplotlib (headless) and writes a figure, for every report plot."""
from __future__ import annotations

from pathlib import Path


def subplots(*args, **kwargs):
    """plt.subplots on the Agg backend: plots are written to files, never shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

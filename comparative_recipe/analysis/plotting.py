"""What every plot of the package shares: the optional matplotlib import, the figure style and
an atomic PNG write. Plots are drawn at ``DPI`` so that a figure of ``PANEL_SIZE`` inches per
panel reads at the width the HTML report embeds it (``REPORT_IMAGE_WIDTH`` CSS pixels)."""

from pathlib import Path
from typing import List, Sequence

from comparative_recipe.outputs import write_file

PLOTS_INSTALL_HINT = (
    "plotting needs matplotlib, an optional extra: pip install 'comparative_recipe[plots]' "
    "(or pip install 'matplotlib>=3.11,<3.12'); the JSON outputs need nothing extra"
)
DPI = 110
PANEL_SIZE = (5.2, 3.6)  # inches per panel
FONT_SIZE = 10
REPORT_IMAGE_WIDTH = 1100  # CSS pixels: the widest an image is shown in the report
# Colour-blind-safe cycle (Okabe-Ito): run / checkpoint i gets COLORS[i % len(COLORS)].
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


def require_matplotlib():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, styled for the package's plots.

    Raises:
        ImportError: matplotlib is not installed; the message says how to install it.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOTS_INSTALL_HINT) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1, "axes.labelsize": FONT_SIZE,
        "legend.fontsize": FONT_SIZE - 1, "xtick.labelsize": FONT_SIZE - 1,
        "ytick.labelsize": FONT_SIZE - 1, "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": DPI,
    })
    return plt


def panel_grid(n_panels: int, max_cols: int = 3, title: str = ""):
    """A figure of ``n_panels`` axes, at most ``max_cols`` per row; unused axes are hidden.

    Returns:
        (figure, list of the ``n_panels`` axes in reading order).
    """
    plt = require_matplotlib()
    n_panels = max(1, n_panels)
    cols = min(max_cols, n_panels)
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + (0.4 if title else 0)),
        squeeze=False,
    )
    flat = [ax for row in axes for ax in row]
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 2)
    return fig, flat[:n_panels]


def save_figure(fig, path) -> Path:
    """Writes ``fig`` as a PNG to ``path`` in one step (a complete file or none) and closes it."""
    plt = require_matplotlib()
    try:
        fig.tight_layout()
        return write_file(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    finally:
        plt.close(fig)


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """Exponential moving average with TensorBoard's debiasing: ``s_t = w s_{t-1} + (1-w) x_t``
    from ``s_0 = 0``, divided by ``1 - w^(t+1)``, so the first value is ``x_0``. NaNs are
    skipped (they keep the previous smoothed value). ``weight`` in [0, 1); 0 returns a copy."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight!r}")
    out, s, n = [], 0.0, 0
    for x in values:
        x = float(x)
        if x == x:  # not NaN
            s, n = weight * s + (1.0 - weight) * x, n + 1
        out.append(s / (1.0 - weight ** n) if n else float("nan"))
    return out


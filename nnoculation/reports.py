"""Human-readable output: Markdown tables and heatmap PNGs (Figure 4 / Table 2 style).

matplotlib is imported only by :func:`heatmap`, and through its object-oriented API (a
``Figure`` saved to PNG), so importing this module selects no backend and changes no global
state of a process that also serves or trains."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nnoculation.predeploy import Cell, PredeployResult, eligible, grid_table

HEATMAP_DPI = 120


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage string; ``-`` for missing values."""
    return "-" if value is None else f"{100 * value:.{digits}f}"


def cell_metric(cell: Cell, metric: str) -> float | None:
    """``holdout_ca`` (what selection sees), ``test_ca`` or ``test_asr`` (worst trigger)."""
    if metric == "holdout_ca":
        return cell.holdout_ca
    if cell.test is None:
        return None
    if metric == "test_ca":
        return cell.test.ca
    return max(cell.test.asr.values(), default=None)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def grid_markdown(result: PredeployResult, metric: str = "holdout_ca") -> str:
    """The grid as in Table 2: rows gamma, columns alpha; eligible cells bold, the pick starred."""

    alphas, gammas, table = grid_table(result.cells, lambda c: cell_metric(c, metric))
    cells = {(c.alpha, c.gamma): c for c in result.cells}
    rows = []
    for g, row in zip(gammas, table, strict=True):
        out: list[object] = [f"{g:.0%}"]
        for a, v in zip(alphas, row, strict=True):
            text = pct(v)
            cell = cells.get((a, g))
            if cell is not None and eligible(cell, result.baseline_ca, result.config.theta):
                text = f"**{text}**"
            if result.picked is not None and (a, g) == (result.picked.alpha, result.picked.gamma):
                text += "*"
            out.append(text)
        rows.append(out)
    return markdown_table(["gamma"] + [f"alpha={a:.4g}" for a in alphas], rows)


def heatmap(result: PredeployResult, metric: str, path: Path, title: str) -> Path:
    """Save a gamma x alpha heatmap of ``metric`` (``holdout_ca``, ``test_ca`` or ``test_asr``)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    alphas, gammas, table = grid_table(result.cells, lambda c: cell_metric(c, metric))
    data = [[float("nan") if v is None else 100 * v for v in row] for row in table]
    fig = Figure(figsize=(1.1 * len(alphas) + 2.5, 0.6 * len(gammas) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(
        data, cmap="viridis" if "ca" in metric else "magma", aspect="auto", origin="lower"
    )
    ax.set_xticks(range(len(alphas)), [f"{a:.4g}" for a in alphas])
    ax.set_yticks(range(len(gammas)), [f"{g:.0%}" for g in gammas])
    ax.set_xlabel("learning rate alpha")
    ax.set_ylabel("noise fraction gamma")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=8)
    if result.picked is not None:
        j = alphas.index(result.picked.alpha)
        i = gammas.index(result.picked.gamma)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    fig.colorbar(im, ax=ax, label="%")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=HEATMAP_DPI, format="png")
    return path

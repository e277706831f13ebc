"""The picture of an AdaLoRA allocation: the final rank of every adapted module as a table and
as a heat map (rows q/k/v/o/gate/up/down, columns the layer index), like Figure 1 of Zhang et
al. (2023, arXiv:2303.10512). matplotlib is optional: without it only the table is made.
"""
from __future__ import annotations

import re
from pathlib import Path

from ...io import atomic_write
from ...plots import matplotlib_missing
from .adalora_allocator import final_ranks

ROWS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[int], list[list[int | None]]]:
    """(row names, layer indices, grid[row][column]) from {module path: rank}; None where a
    module of that kind in that layer is not adapted. Modules outside the LLaMA layers are dropped."""
    cells = {}
    for path, rank in ranks.items():
        match = re.search(r"\.layers\.(\d+)\..*?([^.]+)$", path)
        if match:
            cells[match.group(2), int(match.group(1))] = rank
    names = {kind for kind, _ in cells}
    rows = [r for r in ROWS if r in names] + sorted(names - set(ROWS))
    cols = sorted({layer for _, layer in cells})
    return rows, cols, [[cells.get((row, col)) for col in cols] for row in rows]


def rank_table(ranks: dict[str, int]) -> str:
    """The grid as text, one row per module kind, plus the budget it adds up to."""
    rows, cols, grid = rank_grid(ranks)
    width = max((len(r) for r in rows), default=5)
    lines = [" " * width + " layer " + " ".join(f"{c:>3d}" for c in cols)]
    for row, values in zip(rows, grid):
        lines.append(f"{row:>{width}}       " + " ".join("  ." if v is None else f"{v:>3d}" for v in values))
    total = sum(ranks.values())
    lines.append(f"total rank {total} over {len(ranks)} modules (mean {total / max(len(ranks), 1):.2f})")
    return "\n".join(lines)


def plot_ranks(ranks: dict[str, int], path, title: str = "AdaLoRA: final rank per module") -> bool:
    """Write the heat map to ``path`` (PNG); False when matplotlib is not installed (or nothing to draw)."""
    rows, cols, grid = rank_grid(ranks)
    if not rows:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        return matplotlib_missing()  # said once per process
    values = [[float("nan") if v is None else v for v in row] for row in grid]
    fig = Figure(figsize=(1.2 + 0.7 * max(len(cols), 1), 1.0 + 0.45 * max(len(rows), 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max((v for row in grid for v in row if v is not None), default=1) or 1
    image = ax.imshow(values, cmap="YlGn", aspect="auto", vmin=0, vmax=top)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:  # white digits on the dark cells
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return True


def report(peft_model, folder, adapter_name: str = "default") -> str:
    """The rank table of ``adapter_name`` (returned) and ``folder/adalora_ranks.png`` (with matplotlib)."""
    ranks = final_ranks(peft_model, adapter_name)
    plot_ranks(ranks, Path(folder) / "adalora_ranks.png")
    return rank_table(ranks)

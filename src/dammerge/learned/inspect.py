"""Plots of learned coefficients: per layer, per module type, per model (PNG, Agg backend).

Reads ``dam_coefficients.safetensors`` from a learned merge's output folder. Each tensor there
is one merged tensor's effective coefficients, (participants, d); a plot point is the mean over
d (the input columns). The question these plots answer: does the community's rule of thumb (a
U-shaped or monotone mixing profile over depth) emerge when the data decides?
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from dammerge.errors import DammergeError
from dammerge.learned.export import COEFFICIENTS_FILE
from dammerge.outputs import check_output_folder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS_FOLDER = "coefficient_plots"
LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class CoefficientRow:
    """Mean effective coefficient of one participant for one merged tensor."""

    tensor: str
    layer: int | None
    module: str
    participant: str
    mean: float
    std: float


def load_coefficients(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(folder) / COEFFICIENTS_FILE
    if not path.is_file():
        raise DammergeError(
            f"{folder} holds no {COEFFICIENTS_FILE}",
            "point at the output folder of a learned merge (merge_method: dam or adamerging)",
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata


def module_type(tensor: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj`` (``q_proj.bias`` for biases)."""
    parts = tensor.split(".")
    suffix = parts[-1] if parts[-1] in ("weight", "bias") else None
    stem = parts[:-1] if suffix else parts
    name = stem[-1] if stem else tensor
    return f"{name}.bias" if suffix == "bias" else name


def coefficient_rows(folder: Path) -> tuple[list[CoefficientRow], dict[str, str]]:
    tensors, metadata = load_coefficients(folder)
    participants = json.loads(metadata.get("participants", "[]"))
    rows = []
    for name, values in tensors.items():
        values = values.float().reshape(values.shape[0], -1)
        match = LAYER.search(name)
        for i in range(values.shape[0]):
            label = Path(participants[i]).name if i < len(participants) else f"model {i}"
            rows.append(
                CoefficientRow(
                    tensor=name,
                    layer=int(match.group(1)) if match else None,
                    module=module_type(name),
                    participant=label,
                    mean=float(values[i].mean()),
                    std=float(values[i].std()) if values.shape[1] > 1 else 0.0,
                )
            )
    return rows, metadata


def _by(rows: list[CoefficientRow], key) -> dict:
    grouped: dict = defaultdict(list)
    for row in rows:
        grouped[key(row)].append(row.mean)
    return {k: sum(v) / len(v) for k, v in grouped.items()}


def plots_folder(folder: Path, out_dir: Path | None = None) -> Path:
    """The folder the plots go to (default ``FOLDER/coefficient_plots``), checked writable."""
    return check_output_folder(out_dir or Path(folder) / PLOTS_FOLDER, "plots folder", fill=True)


METHOD_NAMES = {"dam": "DAM", "adamerging": "AdaMerging"}
COLOUR_LABEL = "mean effective coefficient"


def plot_coefficients(folder: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs (by layer; by module type, one panel each; by model, a heat map each);
    returns their paths."""
    from dammerge.plotting import save_png

    out_dir = plots_folder(folder, out_dir)
    return [
        save_png(figure, out_dir / f"coefficients_{name}.png")
        for name, figure in coefficient_figures(folder).items()
    ]


def coefficient_figures(folder: Path) -> dict[str, Figure]:
    """The coefficient plots of a learned merge's output folder, keyed by name (``by_layer``,
    and where block layers were merged ``by_module`` and ``by_model``)."""
    rows, metadata = coefficient_rows(folder)
    participants = list(dict.fromkeys(r.participant for r in rows))
    block = [r for r in rows if r.layer is not None and not r.module.endswith(".bias")]
    method = metadata.get("method", "learned")
    title = (
        f"{METHOD_NAMES.get(method, method)} coefficients"
        f" ({metadata.get('granularity', '?')} granularity,"
        f" {metadata.get('parametrization', '?')} weights)"
    )
    figures = {"by_layer": _by_layer_figure(rows, block, participants, title)}
    if block:
        figures["by_module"] = _by_module_figure(block, participants, title)
        figures["by_model"] = _by_model_figure(block, participants, title)
    return figures


def _by_layer_figure(
    rows: list[CoefficientRow], block: list[CoefficientRow], participants: list[str], title: str
) -> Figure:
    """Mean coefficient per layer, one line per participant (one bar each at model granularity)."""
    from dammerge.plotting import integer_ticks, new_figure

    figure, axes = new_figure(7.5, 4.2)
    ax = axes[0][0]
    if block:
        layers = sorted({r.layer for r in block if r.layer is not None})
        for p in participants:
            means = _by([r for r in block if r.participant == p], lambda r: r.layer)
            ax.plot(sorted(means), [means[k] for k in sorted(means)], marker="o", label=p)
        integer_ticks(ax.xaxis, layers)
        ax.set_xlabel("layer")
        ax.legend(fontsize="small")
    else:  # model granularity: one value per participant
        means = _by(rows, lambda r: r.participant)
        ax.bar(list(means), list(means.values()))
    ax.set_ylabel(COLOUR_LABEL)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return figure


def _by_module_figure(block: list[CoefficientRow], participants: list[str], title: str) -> Figure:
    """One panel per module type: mean coefficient per layer, one line per participant."""
    from dammerge.plotting import line_grid

    panels = {}
    for module in sorted({r.module for r in block}):
        panels[module] = {}
        for p in participants:
            means = _by([r for r in block if r.module == module and r.participant == p], _layer)
            panels[module][p] = [(k, means[k]) for k in sorted(means)]
    return line_grid(panels, title, "mean coefficient")


def _by_model_figure(block: list[CoefficientRow], participants: list[str], title: str) -> Figure:
    """One heat map per participant: module type (rows) by layer (columns), one colour scale."""
    from dammerge.plotting import new_figure

    modules = sorted({r.module for r in block})
    layers = sorted({r.layer for r in block if r.layer is not None})
    grids = []
    for p in participants:
        means = _by([r for r in block if r.participant == p], lambda r: (r.module, r.layer))
        grids.append([[means.get((m, k), float("nan")) for k in layers] for m in modules])
    flat = [v for grid in grids for row in grid for v in row if v == v]
    low, high = (min(flat), max(flat)) if flat else (0.0, 1.0)
    width = 1.6 + len(participants) * min(3.2, max(1.6, 0.45 * len(layers) + 0.6))
    figure, axes = new_figure(width, 1.6 + 0.32 * len(modules), 1, len(participants), sharey=True)
    step = -(-len(layers) // 6)  # at most 6 layer labels per heat map
    for ax, p, grid in zip(axes[0], participants, grids, strict=True):
        image = ax.imshow(grid, aspect="auto", vmin=low, vmax=high, cmap="viridis")
        ax.set_title(p)
        ax.set_xticks(range(0, len(layers), step), [str(k) for k in layers[::step]])
        ax.set_xlabel("layer", fontsize="small")
        ax.tick_params(labelsize="small")
    axes[0][0].set_yticks(range(len(modules)), modules)
    figure.colorbar(image, ax=list(axes[0]), label=COLOUR_LABEL, shrink=0.9)
    figure.suptitle(title)
    return figure


def _layer(row: CoefficientRow) -> int | None:
    return row.layer

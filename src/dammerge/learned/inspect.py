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

import torch
from safetensors import safe_open

from dammerge.errors import DammergeError
from dammerge.learned.export import COEFFICIENTS_FILE
from dammerge.outputs import atomic_file, check_output_folder

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


def plot_coefficients(folder: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = plots_folder(folder, out_dir)
    rows, metadata = coefficient_rows(folder)
    participants = list(dict.fromkeys(r.participant for r in rows))
    block = [r for r in rows if r.layer is not None and not r.module.endswith(".bias")]
    title = (
        f"{metadata.get('method', 'learned')} coefficients ({metadata.get('granularity', '?')},"
        f" {metadata.get('parametrization', '?')} weights)"
    )
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if block:
        for p in participants:
            means = _by([r for r in block if r.participant == p], lambda r: r.layer)
            layers = sorted(means)
            ax.plot(layers, [means[k] for k in layers], marker="o", label=p)
        ax.set_xlabel("layer")
    else:  # model granularity: one value per participant
        means = _by(rows, lambda r: r.participant)
        ax.bar(list(means), list(means.values()))
    ax.set_ylabel("mean effective coefficient")
    ax.set_title(title)
    if block:
        ax.legend()
    written.append(_save(fig, out_dir / "coefficients_by_layer.png"))

    modules = sorted({r.module for r in block})
    if modules:
        cols = min(4, len(modules))
        nrows = -(-len(modules) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
        for ax, module in zip(axes.flat, modules, strict=False):
            for p in participants:
                sel = [r for r in block if r.module == module and r.participant == p]
                means = _by(sel, lambda r: r.layer)
                layers = sorted(means)
                ax.plot(layers, [means[k] for k in layers], marker=".", label=p)
            ax.set_title(module)
            ax.set_xlabel("layer")
        for ax in list(axes.flat)[len(modules) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize="small")
        fig.suptitle(title)
        written.append(_save(fig, out_dir / "coefficients_by_module.png"))

        layers = sorted({r.layer for r in block})
        fig, axes = plt.subplots(
            1, len(participants), figsize=(4 * len(participants), 3.5), squeeze=False
        )
        grids = []
        for p in participants:
            means = _by([r for r in block if r.participant == p], lambda r: (r.module, r.layer))
            grids.append([[means.get((m, k), float("nan")) for k in layers] for m in modules])
        flat = [v for g in grids for row in g for v in row if v == v]
        vmin, vmax = (min(flat), max(flat)) if flat else (0.0, 1.0)
        for index, (ax, p, grid) in enumerate(zip(axes.flat, participants, grids, strict=True)):
            image = ax.imshow(grid, aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_title(p)
            ax.set_yticks(range(len(modules)), modules if index == 0 else [""] * len(modules))
            ax.set_xticks(range(len(layers)), [str(k) for k in layers])
            ax.set_xlabel("layer")
        fig.colorbar(image, ax=list(axes.flat))
        fig.suptitle(title)
        written.append(_save(fig, out_dir / "coefficients_by_model.png"))
    return written


def _save(fig, path: Path) -> Path:
    """Write the PNG atomically (no truncated image on a full disk) and close the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path

"""`dammerge inspect`'s plots: readable at their saved size on a 2-layer and a 24-layer merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dammerge.learned.export import COEFFICIENTS_FILE
from dammerge.learned.inspect import coefficient_figures, plot_coefficients

from ..plot_checks import assert_png_fits, assert_readable, drawn_tick_labels

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTICIPANTS = ("family/lang", "family/math", "family/sql")


def write_coefficients(folder: Path, layers: int) -> Path:
    """A learned merge's coefficient file: (participants, d) per block tensor, known means."""
    tensors = {"model.embed_tokens.weight": torch.full((3, 8), 0.5)}
    for layer in range(layers):
        for index, module in enumerate(MODULES):
            prefix = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            means = torch.tensor([0.30 + 0.01 * layer, 0.33, 0.36 - 0.001 * index])
            tensors[f"model.layers.{layer}.{prefix}.{module}.weight"] = means[:, None].repeat(1, 16)
    metadata = {
        "participants": json.dumps(list(PARTICIPANTS)),
        "method": "dam",
        "granularity": "column",
        "parametrization": "full",
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / COEFFICIENTS_FILE), metadata=metadata)
    return folder


@pytest.mark.parametrize("layers", [2, 24])
def test_coefficient_plots_are_readable(tmp_path: Path, layers: int) -> None:
    folder = write_coefficients(tmp_path / "merge", layers)
    figures = coefficient_figures(folder)
    assert list(figures) == ["by_layer", "by_module", "by_model"]
    for figure in figures.values():
        assert_readable(figure)
    by_layer = figures["by_layer"].axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in by_layer.lines}
    assert lines["math"] == pytest.approx([0.33] * layers)
    assert lines["lang"] == pytest.approx([0.30 + 0.01 * k for k in range(layers)])
    for figure in figures.values():
        for ax in figure.axes:
            if ax.axison and ax.get_xlabel() == "layer":
                ticks = [t.get_text() for t in drawn_tick_labels(ax.xaxis)]
                assert ticks and all(t.isdigit() for t in ticks), ticks
                if layers == 2:
                    assert ticks == ["0", "1"]
    colour_bar = figures["by_model"].axes[-1]
    assert colour_bar.get_ylabel() == "mean effective coefficient"
    module_panels = [ax for ax in figures["by_module"].axes if ax.axison]
    assert sorted(ax.get_title() for ax in module_panels) == sorted(MODULES)
    assert len(figures["by_module"].legends) == 1
    for path in plot_coefficients(folder, tmp_path / "plots"):
        assert_png_fits(path)

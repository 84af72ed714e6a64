"""Fold learned coefficients into plain weights and write a standard checkpoint.

Every tensor of the base checkpoint is written under its own name, recomputed in float32 from
the (memory-mapped) source files with the learned scales, one tensor at a time, through the
foundation's atomic :class:`~dammerge.checkpoint.writer.CheckpointWriter`. The folder loads with
``AutoModelForCausalLM.from_pretrained`` like any other model: the learned merge leaves no trace
in the architecture. Beside the weights: config, generation config, tokenizer, the recipe, a
model card, the training log, and ``dam_coefficients.safetensors`` (the effective coefficients,
for ``dammerge inspect``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dammerge.checkpoint.card import CardFacts, card_text
from dammerge.checkpoint.reader import Checkpoint
from dammerge.checkpoint.writer import CheckpointWriter
from dammerge.config import MergeConfig
from dammerge.learned.model import MergedModel
from dammerge.learned.settings import TrainingSettings
from dammerge.vocabulary.output import write_tokenizer

COEFFICIENTS_FILE = "dam_coefficients.safetensors"
STATS_FILE = "learned_stats.json"
COEFFICIENTS_FORMAT = "dammerge-coefficients/1"


def coefficient_metadata(model: MergedModel, base: Checkpoint, method: str) -> dict[str, str]:
    """What a reader of ``dam_coefficients.safetensors`` needs to interpret its rows."""
    options = model.options
    return {
        "format": COEFFICIENTS_FORMAT,
        "method": method,
        "participants": json.dumps(model.participants()),
        "granularity": options.granularity,
        "parametrization": options.parametrization,
        "activation": options.activation,
        "num_layers": str(base.architecture.num_layers or 0),
    }


def save_coefficients(model: MergedModel, path: Path, metadata: dict[str, str]) -> None:
    """Effective coefficients, one (participants, d) float32 tensor per merged tensor."""
    tensors = {name: t.contiguous() for name, t in model.effective_coefficients().items()}
    save_file(tensors, str(path), metadata=metadata)


def model_card(
    cfg: MergeConfig, settings: TrainingSettings, summary: dict[str, Any], recipe: str
) -> str:
    """The model card of a learned merge: how it was trained, and the recipe as saved."""
    seed = summary.get("seed")
    lines = "\n".join(f"- {key}: {value}" for key, value in summary.items() if key != "seed")
    training = (
        f"{lines}\n\nThe learned coefficients are in `{COEFFICIENTS_FILE}`; "
        "plot them with `dammerge inspect THIS_FOLDER`."
    )
    return card_text(
        CardFacts(
            method=cfg.merge_method,
            description=(
                f"learned merge: {settings.parametrization} weights, "
                f"{settings.granularity} coefficients, objective {settings.objective}"
            ),
            base=Path(cfg.base_model) if cfg.base_model else None,
            sources=[Path(m.model) for m in cfg.models],
            recipe=recipe,
            seed=seed if isinstance(seed, int) else None,
            sections={"Training": training},
        )
    )


@torch.no_grad()
def export_merged(
    model: MergedModel,
    base: Checkpoint,
    sources: list[Checkpoint],
    out: Path,
    *,
    cfg: MergeConfig,
    settings: TrainingSettings,
    shard_size: int,
    overwrite: bool,
    out_dtype: torch.dtype | None = None,
    tokenizer_folder: Path | None = None,
    chat_template: str | None = None,
    log_path: Path | None = None,
    summary: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write the folded merge to ``out`` atomically; returns the final path.

    ``stats`` (the training's compute counts) goes to ``learned_stats.json``, which the
    experiment runner reads into its compute table.
    """
    store = sources + ([base] if model.scheme.base_in_store else [])
    summary = summary or {}
    with CheckpointWriter(out, shard_size=shard_size, overwrite=overwrite) as writer:
        dtypes = set()
        for name in tqdm(base.names(), desc="export", unit="tensor", disable=not progress):
            if not base.dtype(name).is_floating_point:
                writer.add(name, base.get(name))
                continue
            dtype = out_dtype or base.dtype(name)
            dtypes.add(dtype)
            writer.add(name, model.fold_tensor(name, store, base).to(dtype))
        config_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        writer.write_config(base.config, config_dtype)
        generation = base.path / "generation_config.json"
        if generation.is_file():
            writer.copy_file(generation)
        write_tokenizer(writer, tokenizer_folder or base.path, chat_template=chat_template)
        recipe = cfg.to_yaml(writer.out)
        writer.write_text("dammerge_config.yml", recipe)
        writer.write_text("README.md", model_card(cfg, settings, summary, recipe))
        save_coefficients(
            model,
            writer.tmp / COEFFICIENTS_FILE,
            coefficient_metadata(model, base, cfg.merge_method),
        )
        if log_path is not None and log_path.is_file():
            shutil.copyfile(log_path, writer.tmp / "train_log.jsonl")
        if stats is not None:
            writer.write_text(STATS_FILE, json.dumps(stats, indent=2) + "\n")
        return writer.commit()

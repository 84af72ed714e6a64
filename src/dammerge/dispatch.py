"""The one way in: ``merge(recipe, out)`` validates the recipe and hands it to its engine.

The CLI's ``dammerge merge``, the Python API (``dammerge.merge``), the demo and the experiment
runner all come through here, so a recipe means the same thing wherever it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dammerge.config import DEFAULT_SHARD_SIZE, MergeConfig, RunOptions
from dammerge.registry import load_recipe


def merge(
    recipe: MergeConfig | dict[str, Any] | str | Path,
    out: str | Path,
    *,
    device: str = "cpu",
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Path | None:
    """Merge the models of a recipe into a new checkpoint folder ``out``; returns its path.

    ``recipe`` is a :class:`MergeConfig`, a dict shaped like the YAML recipe, or a YAML path
    (relative paths resolve from its folder). The whole recipe is validated first; then every
    input is checked before compute. ``dry_run`` stops there, prints the plan and returns None;
    so does a learned merge stopped early (its training state is kept for a resume). Raises
    :class:`dammerge.errors.DammergeError` for any problem with the inputs; on error nothing is
    left at ``out``.
    """
    validated = load_recipe(recipe)
    options = RunOptions(
        device=device,
        seed=seed,
        shard_size=shard_size,
        overwrite=overwrite,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        progress=progress,
    )
    return validated.method.run(validated.config, validated.settings, Path(out), options)

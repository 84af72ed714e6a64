"""The method registry: every ``merge_method`` a recipe may name, in one table.

Each entry says what kind of method it is (data-free, learned, search), what it does in one
line, where it was published, how its recipe settings are validated, and which engine runs it.
The data-free rows come from the kernel catalogue (:data:`dammerge.methods.METHODS`); the
learned rows bind a preset of the one learned-merge engine; the search row is the evolutionary
engine. The dispatcher (:func:`dammerge.dispatch.merge`), the CLI and the experiment runner look
methods up here and nowhere else; the engines never import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from dammerge.config import MergeConfig, RunOptions, load_config
from dammerge.errors import ConfigError
from dammerge.evolve.settings import EvolveSettings, read_settings
from dammerge.learned.presets import ADAMERGING, DAM
from dammerge.learned.settings import TrainingSettings, parse_settings
from dammerge.methods import METHODS, MergeMethod
from dammerge.plan import check_parameters

MethodKind = Literal["data-free", "learned", "search"]
Runner = Callable[[MergeConfig, Any, Path, RunOptions], Path | None]


@dataclass(frozen=True)
class MethodEntry:
    """One ``merge_method``: what it is, how its settings are read, and what runs it.

    ``settings_model`` is the pydantic model of the recipe's ``training:`` block (None for
    data-free methods, whose recipe carries ``parameters:`` instead); ``parse`` validates a
    whole recipe for this method and returns its typed settings (or None); ``run`` gets the
    recipe, those settings, the output folder and the run options.
    """

    name: str
    kind: MethodKind
    summary: str
    paper: str
    settings_model: type[BaseModel] | None
    parse: Callable[[MergeConfig], BaseModel | None]
    run: Runner
    data_free: MergeMethod | None = None  # the catalogue row of a data-free method

    @property
    def seeded(self) -> bool:
        """Whether the result changes with the seed: learned and searched methods, and the
        stochastic kernels (DARE, DELLA)."""
        return self.kind != "data-free" or bool(self.data_free and self.data_free.stochastic)


@dataclass(frozen=True)
class Recipe:
    """A recipe validated as a whole, before any compute: its method and typed settings."""

    config: MergeConfig
    method: MethodEntry
    settings: BaseModel | None


# -- runners: each imports its engine when a merge runs, so `dammerge --help` stays fast --------
def _run_data_free(cfg: MergeConfig, _settings: Any, out: Path, options: RunOptions):
    from dammerge.executor import merge_data_free

    return merge_data_free(cfg, out, options)


def _run_learned(cfg: MergeConfig, settings: Any, out: Path, options: RunOptions):
    from dammerge.learned.run import run_learned_merge

    return run_learned_merge(cfg, settings, out, options)


def _run_search(cfg: MergeConfig, settings: Any, out: Path, options: RunOptions):
    from dammerge.evolve.run import run_evolve_merge

    return run_evolve_merge(cfg, settings, out, options)


# -- settings: the whole recipe checked against the method, nothing loaded ---------------------
def _data_free_parser(method: MergeMethod) -> Callable[[MergeConfig], None]:
    def parse(cfg: MergeConfig) -> None:
        if cfg.training is not None:
            raise ConfigError(
                f"{method.name} is a data-free method; 'training:' is for learned and search "
                "methods",
                "remove the training block, or choose dam, adamerging or evolve",
            )
        check_parameters(cfg, method)

    return parse


def _learned_parser(preset: Mapping[str, Any]) -> Callable[[MergeConfig], TrainingSettings]:
    def parse(cfg: MergeConfig) -> TrainingSettings:
        if cfg.compute_dtype is not None:
            raise ConfigError(
                "compute_dtype is for data-free merges; a learned merge trains in training.dtype",
                "remove compute_dtype, or set training: {dtype: ...}",
            )
        return parse_settings(cfg.training, preset)

    return parse


def _data_free_entry(method: MergeMethod) -> MethodEntry:
    return MethodEntry(
        name=method.name,
        kind="data-free",
        summary=method.summary,
        paper=method.paper,
        settings_model=None,
        parse=_data_free_parser(method),
        run=_run_data_free,
        data_free=method,
    )


REGISTRY: dict[str, MethodEntry] = {
    **{name: _data_free_entry(method) for name, method in METHODS.items()},
    "dam": MethodEntry(
        name="dam",
        kind="learned",
        summary="learn one coefficient per input column per model by gradient descent, so the "
        "merge matches each specialist (KL) on its own data",
        paper="https://arxiv.org/abs/2410.08371",
        settings_model=TrainingSettings,
        parse=_learned_parser(DAM),
        run=_run_learned,
    ),
    "adamerging": MethodEntry(
        name="adamerging",
        kind="learned",
        summary="learn one task-vector coefficient per layer per model by minimising the merged "
        "model's entropy (no teachers needed)",
        paper="https://arxiv.org/abs/2310.02575",
        settings_model=TrainingSettings,
        parse=_learned_parser(ADAMERGING),
        run=_run_learned,
    ),
    "evolve": MethodEntry(
        name="evolve",
        kind="search",
        summary="CMA-ES search over per-layer parameters of a data-free method, scored on "
        "held-in data; exports the best recipe",
        paper="https://arxiv.org/abs/2403.13187",
        settings_model=EvolveSettings,
        parse=read_settings,
        run=_run_search,
    ),
}


def get_entry(name: str) -> MethodEntry:
    """The registry entry of ``merge_method: name``, or a one-line error listing the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r}", f"choose one of: {', '.join(sorted(REGISTRY))}"
        ) from None


def load_recipe(source: MergeConfig | dict[str, Any] | str | Path) -> Recipe:
    """Read and validate a whole recipe (``training:`` included) before any compute."""
    config = load_config(source)
    method = get_entry(config.merge_method)
    if config.slices and method.kind != "data-free":
        raise ConfigError(
            f"{method.name} merges whole models; 'slices' are for data-free methods",
            "list the models under 'models:'",
        )
    return Recipe(config, method, method.parse(config))

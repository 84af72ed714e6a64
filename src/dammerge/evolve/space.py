"""The search space: a genome in [0, 1]^D and the ordinary data-free recipe it stands for.

Each gene is one value of one searched parameter (``weight`` or ``density`` of one model, or a
global such as slerp's ``t``) for one *layer group* (a contiguous run of transformer blocks) and
one *module group* (a tensor-name filter such as ``self_attn`` or ``mlp``, plus a catch-all for
everything else: embeddings, norms, ``lm_head``).

A genome is decoded into values the recipe language already has, so the best genome exports as
a plain recipe that ``dammerge merge`` and mergekit both read:

- layer groups become a *gradient* list with one entry per layer (constant inside a group).
  A gradient of L values is evaluated exactly at ``layer / (L - 1)``, so block ``l`` gets its
  group's value; tensors outside the blocks follow the recipe rule (mergekit's): embeddings,
  the final norm and ``lm_head`` resolve at depth 0, i.e. take the first layer group's value;
- module groups become ``[{filter: self_attn, value: ...}, {filter: mlp, value: ...},
  {value: ...}]`` (first matching filter wins; the last entry catches the rest).

Values are rounded to ``decimals`` before use, so the candidate that was scored and the recipe
that is written are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dammerge.config import InputModel, MergeConfig, resolve_value
from dammerge.errors import ConfigError
from dammerge.evolve.settings import DEFAULT_LAYER_GROUPS, EvolveSettings, bounds_of
from dammerge.methods import MergeMethod

REST = None  # the module group of tensors that match no filter


@dataclass(frozen=True)
class Gene:
    """One searched number: parameter × model (or global) × module group × layer group."""

    param: str
    model: int | None
    module: str | None
    first_layer: int
    last_layer: int
    low: float
    high: float

    def label(self, model_labels: list[str]) -> str:
        scope = "global" if self.model is None else model_labels[self.model]
        module = "rest" if self.module is REST else self.module
        layers = f"layers {self.first_layer}-{self.last_layer}"
        return f"{self.param}[{scope}][{module}][{layers}]"


def participants_of(cfg: MergeConfig, method: MergeMethod) -> list[InputModel]:
    """The recipe's models that the method merges (the base is not one for base methods)."""
    if not method.takes_base or cfg.base_model is None:
        return list(cfg.models)
    base = Path(cfg.base_model).resolve()
    return [m for m in cfg.models if Path(m.model).resolve() != base]


def layer_ranges(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous, as-even-as-possible runs of blocks: ``(first, last)`` per group."""
    return [(int(part[0]), int(part[-1])) for part in np.array_split(np.arange(num_layers), groups)]


class SearchSpace:
    """Genes of one search, and the mapping from a normalised genome to a data-free recipe."""

    def __init__(
        self,
        cfg: MergeConfig,
        method: MergeMethod,
        params: list[str],
        settings: EvolveSettings,
        num_layers: int | None,
    ) -> None:
        self.cfg = cfg
        self.method = method
        self.params = params
        self.settings = settings
        self.participants = participants_of(cfg, method)
        self.num_layers = num_layers or 1
        self.layer_groups = self._layer_group_count(settings, num_layers)
        self.modules: list[str | None] = [*settings.module_groups, REST]
        self.genes = self._make_genes()
        self.model_labels = _unique_labels([m.model for m in self.participants])
        self._check_fixed_parameters()

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def _layer_group_count(settings: EvolveSettings, num_layers: int | None) -> int:
        if settings.layer_groups is None:
            return min(DEFAULT_LAYER_GROUPS, num_layers or 1)
        if num_layers is None and settings.layer_groups > 1:
            raise ConfigError(
                "training.layer_groups > 1 needs the number of layers, which this "
                "architecture's config.json does not give",
                "set layer_groups: 1",
            )
        if num_layers is not None and settings.layer_groups > num_layers:
            raise ConfigError(
                f"training.layer_groups is {settings.layer_groups} but the models have "
                f"{num_layers} layers",
                f"use at most {num_layers} (one group per layer)",
            )
        return settings.layer_groups

    def _make_genes(self) -> list[Gene]:
        genes = []
        ranges = layer_ranges(self.num_layers, self.layer_groups)
        for param in self.params:
            low, high = bounds_of(self.settings, param)
            scopes: list[int | None] = (
                list(range(len(self.participants))) if param in self.method.model_params else [None]
            )
            for scope in scopes:
                for module in self.modules:
                    for first, last in ranges:
                        genes.append(Gene(param, scope, module, first, last, low, high))
        return genes

    def _check_fixed_parameters(self) -> None:
        for entry in self.participants:
            clash = set(entry.parameters) & set(self.params)
            if clash:
                raise ConfigError(
                    f"models[{entry.model}].parameters sets {sorted(clash)[0]!r}, which the "
                    "search tunes",
                    "remove it there, or leave it out of training.search to keep it fixed",
                )
        clash = set(self.cfg.parameters) & set(self.params)
        if clash:
            key = sorted(clash)[0]
            raise ConfigError(
                f"parameters.{key} is fixed in the recipe but also searched",
                "remove it from parameters, or leave it out of training.search",
            )

    def check_filters(self, tensor_names: list[str]) -> None:
        """Every module filter must select at least one tensor (a typo would be a dead gene)."""
        for pattern in self.settings.module_groups:
            probe = [{"filter": pattern, "value": 1.0}]  # the recipe's own filter rule
            if not any(resolve_value(probe, name, 0.0) is not None for name in tensor_names):
                raise ConfigError(
                    f"training.module_groups: filter {pattern!r} matches no tensor",
                    f"tensor names look like {tensor_names[min(3, len(tensor_names) - 1)]}",
                )

    # -- genome <-> values ----------------------------------------------------------------
    @property
    def dims(self) -> int:
        return len(self.genes)

    def default_popsize(self) -> int:
        """CMA-ES's own default population size for this dimension."""
        return 4 + int(3 * np.log(self.dims))

    def x0(self) -> np.ndarray:
        """The start point (normalised): Model Soups-like weights, mid-range for the rest."""
        start = []
        for gene in self.genes:
            value = self.settings.init.get(gene.param, self._default_init(gene))
            value = min(max(value, gene.low), gene.high)
            start.append((value - gene.low) / (gene.high - gene.low))
        return np.asarray(start, dtype=float)

    def _default_init(self, gene: Gene) -> float:
        if gene.param == "weight":
            return 1.0 / len(self.participants)
        if gene.param == "lambda":
            return 1.0
        return 0.5 * (gene.low + gene.high)

    def values(self, x: np.ndarray) -> list[float]:
        """Parameter values of a normalised genome (clipped into bounds, rounded)."""
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        return [
            round(float(g.low + xi * (g.high - g.low)), self.settings.decimals)
            for g, xi in zip(self.genes, x, strict=True)
        ]

    def describe(self, x: np.ndarray) -> dict[str, float]:
        """Gene label -> value, for the log and for people."""
        return {
            g.label(self.model_labels): v for g, v in zip(self.genes, self.values(x), strict=True)
        }

    # -- genome -> recipe -----------------------------------------------------------------
    def to_config(self, x: np.ndarray) -> MergeConfig:
        """The ordinary data-free recipe that a genome stands for."""
        table: dict[tuple[str, int | None, str | None], list[float]] = {}
        for gene, value in zip(self.genes, self.values(x), strict=True):
            per_layer = table.setdefault(
                (gene.param, gene.model, gene.module), [0.0] * self.num_layers
            )
            for layer in range(gene.first_layer, gene.last_layer + 1):
                per_layer[layer] = value

        def expression(param: str, scope: int | None) -> Any:
            values = [self._compact(table[(param, scope, module)]) for module in self.modules]
            if len(self.modules) == 1:
                return values[0]
            return [
                {"value": v} if module is REST else {"filter": module, "value": v}
                for module, v in zip(self.modules, values, strict=True)
            ]

        models = []
        for index, entry in enumerate(self.participants):
            parameters = dict(entry.parameters)
            for param in self.params:
                if param in self.method.model_params:
                    parameters[param] = expression(param, index)
            models.append(InputModel(model=entry.model, parameters=parameters))
        parameters = {k: v for k, v in self.cfg.parameters.items() if k != "method"}
        for param in self.params:
            if param not in self.method.model_params:
                parameters[param] = expression(param, None)
        return MergeConfig(
            merge_method=self.method.name,
            base_model=self.cfg.base_model,
            models=models,
            parameters=parameters,
            dtype=self.cfg.dtype,
            out_dtype=self.cfg.out_dtype,
            compute_dtype=self.cfg.compute_dtype,
            tokenizer_source=self.cfg.tokenizer_source,
            tokenizer=self.cfg.tokenizer,
            chat_template=self.cfg.chat_template,
            name=self.cfg.name,
        )

    def _compact(self, per_layer: list[float]) -> float | list[float]:
        return per_layer[0] if self.layer_groups == 1 else list(per_layer)


def _unique_labels(paths: list[str]) -> list[str]:
    names = [Path(p).name or p for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{name}" for i, name in enumerate(names)]

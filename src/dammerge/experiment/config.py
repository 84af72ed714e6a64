"""The experiment file: which methods and seeds to run over one family of models and data.

An experiment names a family folder (models + representative data + eval sets, see
``dammerge.family.manifest``) and a list of methods, each given as an ordinary merge recipe
*without* ``base_model``/``models``: the runner fills those from the family, so one recipe
describes the same merge for any family. Example::

    name: small-family
    family: demo-output/family-near
    build: {size: small, seed: 0, regime: near}   # build the family first if it is missing
    seeds: [0, 1, 2]
    evaluation: {limit: 64}
    methods:
      - name: Model Soups
        recipe: {merge_method: linear}
      - name: TIES
        recipe: {merge_method: ties, parameters: {weight: 1.0, density: 0.5}}
      - name: DAM
        recipe: {merge_method: dam, training: {steps: 300}}
        dataset: {samples: 256}
      - name: KL + Cosine
        group: ablation
        recipe: {merge_method: dam, training: {objective: kl, lambda_cos: 0.01}}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dammerge.config import read_yaml_file, validation_error
from dammerge.errors import ConfigError
from dammerge.family.manifest import DEFAULT_REGIME
from dammerge.registry import REGISTRY


def depends_on_seed(method: str) -> bool:
    """Whether a merge method's result changes with the seed (see the registry); an unknown
    method is reported when the cell's recipe is validated."""
    return method in REGISTRY and REGISTRY[method].seeded


class FamilyBuild(BaseModel):
    """How to build the family when its folder does not exist yet."""

    model_config = ConfigDict(extra="forbid")
    size: Literal["micro", "small"] = "small"
    seed: int = 0
    regime: Literal["near", "far"] = DEFAULT_REGIME


class MethodSpec(BaseModel):
    """One row of the report: a merge recipe run once, or once per seed."""

    model_config = ConfigDict(extra="forbid")
    name: str
    recipe: dict[str, Any]
    group: Literal["main", "ablation"] = "main"
    seeded: bool | None = None  # None: decided by the merge method
    dataset: dict[str, Any] = Field(default_factory=dict)  # merged into every model's dataset
    sources: list[str] | None = None  # family domains to merge (default: all; slerp takes 1)

    @field_validator("recipe")
    @classmethod
    def _has_method(cls, recipe: dict[str, Any]) -> dict[str, Any]:
        if "merge_method" not in recipe:
            raise ValueError("recipe needs a merge_method")
        for key in ("base_model", "models"):
            if key in recipe:
                raise ValueError(
                    f"recipe must not set {key!r}: the runner takes it from the family"
                )
        return recipe

    @property
    def method(self) -> str:
        return str(self.recipe["merge_method"])

    @property
    def is_seeded(self) -> bool:
        return depends_on_seed(self.method) if self.seeded is None else self.seeded

    @property
    def slug(self) -> str:
        """A folder name for the method's cells."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "method"


class EvaluationSpec(BaseModel):
    """Options handed to the evaluator for every cell."""

    model_config = ConfigDict(extra="forbid")
    limit: int | None = None  # eval records per domain (None: all)
    batch_size: int = 16
    max_new_tokens: int | None = None


class ExperimentConfig(BaseModel):
    """A whole experiment: a family, methods, seeds, evaluation options."""

    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    family: str
    build: FamilyBuild | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    device: str = "cpu"
    references: list[str] = Field(default_factory=lambda: ["base", "lang", "math", "sql"])
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    methods: list[MethodSpec] = Field(min_length=1)

    @field_validator("methods")
    @classmethod
    def _unique_names(cls, methods: list[MethodSpec]) -> list[MethodSpec]:
        slugs = [m.slug for m in methods]
        duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique, repeated: {', '.join(duplicates)}")
        return methods

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        """Read an experiment file; relative paths are taken from the file's folder."""
        path = Path(path)
        data = read_yaml_file(path, "experiment file")
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping (name, family, methods, ...)")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(
                exc,
                cls,
                str(path),
                "see docs/evaluation.md (experiments) or the shipped "
                "src/dammerge/experiment/shipped/quick.yaml",
            ) from None
        family = Path(config.family)
        if not family.is_absolute():
            config = config.model_copy(update={"family": str((path.parent / family).resolve())})
        return config

"""The ``training:`` block of a learned-merge recipe (each model's ``dataset:`` block is
:class:`dammerge.data.spec.DatasetSpec`).

It is a pydantic model with ``extra="forbid"``: a misspelt option is an error naming it, not a
silently ignored default. :func:`parse_settings` applies the presets (see
:mod:`dammerge.learned.presets`) and turns validation errors into one-line ``ConfigError``\\ s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dammerge.config import DTYPES, validation_error
from dammerge.errors import ConfigError
from dammerge.learned.kernels import KernelChoice
from dammerge.learned.layers import Activation, Granularity, InitSpec, Parametrization
from dammerge.learned.presets import ABLATION_PRESETS, resolve_training


class TrainingSettings(BaseModel):
    """Every option of learned merging (defaults before presets are applied)."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    # what is learned
    parametrization: Parametrization = "full"
    granularity: Granularity = "column"
    activation: Activation = "none"
    init: InitSpec = "uniform"
    clamp: bool = False
    merge_embeddings: bool = False
    merge_norms: bool = False
    include_base: bool = False
    # objective
    objective: Literal["kl", "mse", "entropy"] = "kl"
    temperature: float = Field(default=2.0, gt=0)
    kl_direction: Literal["forward", "reverse"] = "forward"
    lambda_cos: float = Field(default=0.0, ge=0)
    lambda_l1: float = Field(default=0.0, ge=0)
    lambda_l2: float = Field(default=0.0, ge=0)
    loss_on: Literal["all", "response"] = "all"
    teacher: Literal["on_the_fly", "precomputed"] = "on_the_fly"
    top_k: int = Field(default=64, gt=0)
    # optimisation
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=1, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    max_length: int = Field(default=2048, gt=1)
    gradient_checkpointing: bool = False
    offload: Literal["none", "layers"] = "none"  # layers: stores in host memory, streamed
    # passes over the weight stores: compiled (fused) or eager torch operations; layers: every
    # decoder layer compiled whole, the merged linears inside it
    kernels: KernelChoice = "auto"
    dtype: str | None = None  # weights and activations; coefficients are always float32
    # under torchrun: replicate (default) or shard the merge module; one process ignores it
    distributed: Literal["replicate", "shard"] | None = None
    # bookkeeping
    checkpoint_every: int = Field(default=50, gt=0)
    log_every: int = Field(default=1, gt=0)
    resume: bool | Literal["auto"] = "auto"
    work_dir: str | None = None
    keep_work: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSettings:
        if self.preset is not None and self.preset not in ABLATION_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (use {', '.join(ABLATION_PRESETS)})")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.dtype is not None and self.dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (use {', '.join(sorted(DTYPES))})")
        if self.include_base and self.parametrization == "task_vectors":
            raise ValueError(
                "include_base has no meaning with task_vectors (the base is the origin)"
            )
        return self


def parse_settings(
    training: dict[str, Any] | None, method_preset: Mapping[str, Any]
) -> TrainingSettings:
    """The validated ``training:`` block of a recipe, on top of its method's preset (see
    :mod:`dammerge.learned.presets`)."""
    if training is not None and not isinstance(training, dict):
        raise ConfigError("training: must be a mapping of options")
    try:
        return TrainingSettings.model_validate(resolve_training(method_preset, training))
    except ValidationError as exc:
        raise validation_error(
            exc,
            TrainingSettings,
            "training",
            "see docs/dam.md for the training keys and their values",
            separator=".",
        ) from None

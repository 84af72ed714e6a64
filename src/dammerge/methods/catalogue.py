"""The catalogue of data-free merge methods: every method is a row composing the kernels.

The task-vector family (mergekit's generalised task arithmetic) is one table,
:data:`TASK_VECTOR_ROWS`: a row names how each task vector ``δ_i = W_i − B`` is sparsified,
whether entries are selected across the models, how the models are weighted, and whether a sign
consensus precedes the sum. The columns are :class:`Sparsifier`, :class:`Selection` and
:class:`Weighting` records; each binds recipe parameters to its kernel's arguments, here and
nowhere else, and one runner (:func:`merge_task_vectors`) executes every row. Linear, RAM, the
spherical methods (SLERP, NuSLERP, Multi-SLERP, Karcher), Model Stock, NearSwap and Arcee Fusion
are not task-vector sums and are listed beside the table with their one-line bindings, as is
passthrough (one model's tensors, optionally scaled: layer stacking with ``slices``). Each
record lists its parameters with their defaults and, where values are restricted, their
:class:`~dammerge.methods.base.ValueRange`.

Adding a method is a kernel (in ``sparsify.py``, ``combine.py`` or a module of its own) and a
row; see ``docs/adding-a-method.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from dammerge.methods.base import (
    COUNT,
    FLAG,
    NON_NEGATIVE,
    POSITIVE,
    REQUIRED,
    MergeInputs,
    MergeMethod,
)
from dammerge.methods.combine import (
    SCE_CONSENSUS,
    TIES_CONSENSUS,
    SignConsensus,
    combine_task_vectors,
    energy_weights,
)
from dammerge.methods.linear import linear
from dammerge.methods.model_stock import model_stock
from dammerge.methods.ram import reinforced_agent_merge
from dammerge.methods.selective import arcee_fusion, nearswap
from dammerge.methods.slerp import interpolation_position, nuslerp, slerp
from dammerge.methods.sparsify import (
    RescaleMode,
    magnitude_band,
    magnitude_prune,
    magnitude_ranked_drop,
    random_drop,
    rescale_kept,
    top_variance_mask,
)
from dammerge.methods.sphere import karcher_mean, multislerp

Params = Mapping[str, Any]


@dataclass(frozen=True)
class Sparsifier:
    """Column *sparsify*: thins each task vector on its own, model by model.

    ``apply(delta, own, params, generator)`` gets one task vector, that model's resolved
    parameters (``own``) and the global ones; ``model_params`` / ``global_params`` are the recipe
    parameters it reads, with their defaults.
    """

    apply: Callable[[torch.Tensor, Params, Params, torch.Generator | None], torch.Tensor]
    model_params: dict[str, Any] = field(default_factory=dict)
    global_params: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False


@dataclass(frozen=True)
class Selection:
    """Column *select*: keeps entries chosen across all task vectors (one mask for all).

    ``mask(deltas, params)`` returns a boolean mask shaped like one task vector.
    """

    mask: Callable[[Sequence[torch.Tensor], Params], torch.Tensor]
    global_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Weighting:
    """Column *weights*: the weight ``w_i`` of each task vector in the sum.

    ``weights(deltas, model_params)`` sees the task vectors after sparsify and select.
    """

    weights: Callable[[Sequence[torch.Tensor], Sequence[Params]], list[float]]
    model_params: dict[str, Any] = field(default_factory=dict)


def _l1_if_rescale(params: Params) -> RescaleMode:
    """TIES and breadcrumbs: ``rescale: true`` restores each task vector's L1 norm."""
    return "l1" if params["rescale"] else "none"


def _recipe_weights(model_params: Sequence[Params]) -> list[float]:
    """The recipe's per-model ``weight`` parameters."""
    return [float(p["weight"]) for p in model_params]


def _dare_rescale(params: Params) -> RescaleMode:
    """DARE: ``rescale: false`` keeps the survivors, else ``rescale_mode`` (l1 or density)."""
    if not params["rescale"]:
        return "none"
    mode = str(params["rescale_mode"])
    if mode not in ("l1", "density"):
        raise ValueError(f"rescale_mode must be 'l1' or 'density', got {mode!r}")
    return mode  # type: ignore[return-value]


# --- column values: recipe parameters bound to kernel arguments -------------------------------

TRIM = Sparsifier(  # TIES
    lambda delta, own, params, _: rescale_kept(
        delta,
        magnitude_prune(delta, float(own["density"])),
        float(own["density"]),
        _l1_if_rescale(params),
    ),
    model_params={"density": 1.0},
)
BAND = Sparsifier(  # Model Breadcrumbs
    lambda delta, own, params, _: rescale_kept(
        delta,
        magnitude_band(delta, float(own["density"]), float(own["gamma"])),
        float(own["density"]),
        _l1_if_rescale(params),
    ),
    model_params={"density": 1.0, "gamma": 0.01},
)
DROP = Sparsifier(  # DARE
    lambda delta, own, params, generator: random_drop(
        delta, float(own["density"]), generator, _dare_rescale(params)
    ),
    model_params={"density": 1.0},
    global_params={"rescale_mode": "l1"},
    stochastic=True,
)
MAGPRUNE = Sparsifier(  # DELLA
    lambda delta, own, params, generator: magnitude_ranked_drop(
        delta,
        float(own["density"]),
        float(own["epsilon"]),
        generator,
        bool(params["rescale"]),
        str(params["rescale_mode"]),  # type: ignore[arg-type]
    ),
    model_params={"density": 1.0, "epsilon": 0.15},
    global_params={"rescale_mode": "l1"},
    stochastic=True,
)
TOP_VARIANCE = Selection(  # SCE's select
    lambda deltas, params: top_variance_mask(deltas, float(params["select_topk"])),
    global_params={"select_topk": 1.0},
)
RECIPE_WEIGHTS = Weighting(
    lambda _, model_params: _recipe_weights(model_params), model_params={"weight": REQUIRED}
)
ENERGY_WEIGHTS = Weighting(lambda deltas, _: energy_weights(deltas))  # SCE's calculate


@dataclass(frozen=True)
class TaskVectorRow:
    """One task-vector method: ``B + λ · combine_i(w_i · select(sparsify(δ_i)))``.

    ``normalize`` and ``rescale`` are the defaults of those recipe parameters (``rescale``
    ``None``: the method does not take it). Every row also takes ``lambda`` (1.0) and
    ``int8_mask`` (a memory option of mergekit's, accepted for its recipes, without effect).
    """

    name: str
    summary: str
    paper: str
    sparsify: Sparsifier | None = None
    select: Selection | None = None
    weighting: Weighting = RECIPE_WEIGHTS
    consensus: SignConsensus | None = None
    normalize: bool = False
    rescale: bool | None = False


DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

TASK_VECTOR_ROWS: tuple[TaskVectorRow, ...] = (
    TaskVectorRow(
        "task_arithmetic",
        "base + lambda * weighted sum of task vectors (W_i - base)",
        "https://arxiv.org/abs/2212.04089",
    ),
    TaskVectorRow(
        "ties",
        "trim task vectors by magnitude, elect signs, disjoint mean",
        "https://arxiv.org/abs/2306.01708",
        sparsify=TRIM,
        consensus=TIES_CONSENSUS,
        normalize=True,
    ),
    TaskVectorRow(
        "dare_linear",
        "random drop + rescale of task vectors, then weighted sum",
        DARE_PAPER,
        sparsify=DROP,
        rescale=True,
    ),
    TaskVectorRow(
        "dare_ties",
        "random drop + rescale of task vectors, then TIES sign election",
        DARE_PAPER,
        sparsify=DROP,
        consensus=TIES_CONSENSUS,
        rescale=True,
    ),
    TaskVectorRow(
        "breadcrumbs",
        "keep a magnitude band of each task vector (drop outliers and small entries)",
        BREADCRUMBS_PAPER,
        sparsify=BAND,
    ),
    TaskVectorRow(
        "breadcrumbs_ties",
        "breadcrumbs sparsification, then TIES sign election",
        BREADCRUMBS_PAPER,
        sparsify=BAND,
        consensus=TIES_CONSENSUS,
    ),
    TaskVectorRow(
        "della",
        "magnitude-ranked random drop (MagPrune), then TIES sign election",
        DELLA_PAPER,
        sparsify=MAGPRUNE,
        consensus=TIES_CONSENSUS,
        normalize=True,
        rescale=True,
    ),
    TaskVectorRow(
        "della_linear",
        "magnitude-ranked random drop (MagPrune), then weighted sum",
        DELLA_PAPER,
        sparsify=MAGPRUNE,
        rescale=True,
    ),
    TaskVectorRow(
        "sce",
        "select high-variance entries, weight models by energy, erase minority signs, mean",
        "https://arxiv.org/abs/2408.07990",
        select=TOP_VARIANCE,
        weighting=ENERGY_WEIGHTS,
        consensus=SCE_CONSENSUS,
        normalize=True,
        rescale=None,
    ),
)


def _base(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None, "the planner gives a base to methods that require one"
    return inputs.base


def merge_task_vectors(row: TaskVectorRow, inputs: MergeInputs) -> torch.Tensor:
    """Run one task-vector row on one tensor.

    Each task vector is formed and sparsified before the next is formed, so a sparsifier's
    temporaries are never alive for all models at once.
    """
    base, params = _base(inputs), inputs.params
    deltas = []
    for tensor, own in zip(inputs.tensors, inputs.model_params, strict=True):
        delta = tensor - base
        if row.sparsify is not None:
            delta = row.sparsify.apply(delta, own, params, inputs.generator)
        deltas.append(delta)
        del delta
    if row.select is not None:
        keep = row.select.mask(deltas, params)
        for delta in deltas:
            delta.mul_(keep)
        del keep
    return combine_task_vectors(
        base,
        deltas,
        row.weighting.weights(deltas, inputs.model_params),
        consensus=row.consensus,
        normalize=bool(params["normalize"]),
        lambda_=float(params["lambda"]),
    )


def task_vector_method(row: TaskVectorRow) -> MergeMethod:
    """The :class:`MergeMethod` record of a row: its parameters gathered from its columns."""
    columns = [c for c in (row.sparsify, row.select) if c is not None]
    rescale = {} if row.rescale is None else {"rescale": row.rescale}
    global_params = {"normalize": row.normalize, "lambda": 1.0, **rescale}
    for column in columns:
        global_params.update(column.global_params)
    model_params = dict(row.weighting.model_params)
    if row.sparsify is not None:
        model_params.update(row.sparsify.model_params)
    flags = [key for key in ("normalize", "rescale") if key in global_params]
    return MergeMethod(
        name=row.name,
        summary=row.summary,
        paper=row.paper,
        run=partial(merge_task_vectors, row),
        model_params=model_params,
        global_params={**global_params, "int8_mask": False},
        ranges={key: FLAG for key in (*flags, "int8_mask")},
        requires_base=True,
        stochastic=row.sparsify is not None and row.sparsify.stochastic,
    )


LINEAR = MergeMethod(
    name="linear",
    summary="weighted average of all models (Model Soups with equal weights)",
    paper="https://arxiv.org/abs/2203.05482",
    run=lambda inputs: linear(
        inputs.tensors,
        _recipe_weights(inputs.model_params),
        normalize=bool(inputs.params["normalize"]),
    ),
    model_params={"weight": REQUIRED},
    global_params={"normalize": True},
    ranges={"normalize": FLAG},
)
SLERP = MergeMethod(
    name="slerp",
    summary="spherical interpolation between base (t=0) and one other model (t=1)",
    paper="https://doi.org/10.1145/325165.325242",
    run=lambda inputs: slerp(float(inputs.params["t"]), _base(inputs), inputs.tensors[0]),
    global_params={"t": REQUIRED},
    requires_base=True,
    max_models=1,
)
MODEL_STOCK = MergeMethod(
    name="model_stock",
    summary="average of fine-tuned models pulled toward the base by their task-vector angle",
    paper="https://arxiv.org/abs/2403.19522",
    run=lambda inputs: model_stock(
        _base(inputs), inputs.tensors, filter_wise=bool(inputs.params["filter_wise"])
    ),
    global_params={"filter_wise": False},
    ranges={"filter_wise": FLAG},
    requires_base=True,
    min_models=2,
)


def passthrough(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """One model's tensor unchanged, or multiplied by ``scale`` (mergekit's passthrough; a
    scale of 0 silences a module, e.g. ``o_proj`` of a duplicated layer)."""
    return tensor if scale == 1.0 else tensor * scale


PASSTHROUGH = MergeMethod(
    name="passthrough",
    summary="copy one model's tensors (per slice: layer stacking), optionally scaled",
    paper="https://github.com/arcee-ai/mergekit",
    run=lambda inputs: passthrough(inputs.tensors[0], float(inputs.model_params[0]["scale"])),
    model_params={"scale": 1.0},
    max_models=1,
)

RAM_PAPER = "https://arxiv.org/abs/2601.13572"
RAM = MergeMethod(
    name="ram",
    summary="keep task-vector entries one model changes, average those several models change",
    paper=RAM_PAPER,
    run=lambda inputs: reinforced_agent_merge(
        _base(inputs), inputs.tensors, epsilon=float(inputs.params["epsilon"])
    ),
    global_params={"epsilon": 1e-5},
    ranges={"epsilon": NON_NEGATIVE},
    requires_base=True,
)
RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    summary="RAM, each model's unique entries amplified by its shared/unique ratio in the tensor",
    paper=RAM_PAPER,
    run=lambda inputs: reinforced_agent_merge(
        _base(inputs),
        inputs.tensors,
        epsilon=float(inputs.params["epsilon"]),
        r=float(inputs.params["r"]),
        alpha=float(inputs.params["alpha"]),
    ),
    global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    ranges={"r": NON_NEGATIVE, "alpha": NON_NEGATIVE, "epsilon": POSITIVE},
    requires_base=True,
)


def on_task_vectors(
    inputs: MergeInputs, merge: Callable[[Sequence[torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """``merge`` of the models' tensors; with a base, of their task vectors ``W_i − B``, and
    the base added back (the methods whose base is optional)."""
    base = inputs.base
    if base is None:
        return merge(inputs.tensors)
    return base + merge([tensor - base for tensor in inputs.tensors])


def _nuslerp(inputs: MergeInputs) -> torch.Tensor:
    t = interpolation_position(*_recipe_weights(inputs.model_params))
    flatten = bool(inputs.params["nuslerp_flatten"])
    row_wise = bool(inputs.params["nuslerp_row_wise"])
    return on_task_vectors(
        inputs, lambda xs: nuslerp(t, xs[0], xs[1], flatten=flatten, row_wise=row_wise)
    )


def _multislerp(inputs: MergeInputs) -> torch.Tensor:
    if len(inputs.tensors) == 1:  # one model: itself, with or without a base
        return inputs.tensors[0]
    weights = _recipe_weights(inputs.model_params)
    normalize = bool(inputs.params["normalize_weights"])
    eps = float(inputs.params["eps"])
    return on_task_vectors(
        inputs, lambda xs: multislerp(xs, weights, normalize_weights=normalize, eps=eps)
    )


NUSLERP = MergeMethod(
    name="nuslerp",
    summary="spherical interpolation of two models (of their task vectors with a base), "
    "t = w2 / (w1 + w2); whole tensors or row/column vectors",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    run=_nuslerp,
    model_params={"weight": REQUIRED},
    global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
    ranges={"nuslerp_flatten": FLAG, "nuslerp_row_wise": FLAG},
    optional_base=True,
    min_models=2,
    max_models=2,
)
MULTISLERP = MergeMethod(
    name="multislerp",
    summary="weighted mean of N models (of their task vectors with a base) on the sphere, "
    "at their weighted mean norm",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    run=_multislerp,
    model_params={"weight": REQUIRED},
    global_params={"normalize_weights": True, "eps": 1e-8},
    ranges={"normalize_weights": FLAG, "eps": POSITIVE},
    optional_base=True,
)
KARCHER = MergeMethod(
    name="karcher",
    summary="Karcher (Riemannian) mean of the models' directions on the sphere, at their mean "
    "norm; a base_model is one more model",
    paper="https://arxiv.org/abs/2603.04972",
    run=lambda inputs: karcher_mean(
        inputs.tensors,
        max_iter=int(inputs.params["max_iter"]),
        tol=float(inputs.params["tol"]),
    ),
    global_params={"max_iter": 10, "tol": 1e-5},
    ranges={"max_iter": COUNT, "tol": NON_NEGATIVE},
    base_joins_models=True,
)
NEARSWAP = MergeMethod(
    name="nearswap",
    summary="move each base entry toward the other model by at most t: close entries swap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    run=lambda inputs: nearswap(float(inputs.params["t"]), _base(inputs), inputs.tensors[0]),
    global_params={"t": REQUIRED},
    ranges={"t": NON_NEGATIVE},
    requires_base=True,
    max_models=1,
)
ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    summary="take the other model's entries whose change (|delta| x row KL) is an outlier, "
    "keep the base elsewhere",
    paper="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
    run=lambda inputs: arcee_fusion(_base(inputs), inputs.tensors[0]),
    requires_base=True,
    max_models=1,
)

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        LINEAR,
        *(task_vector_method(row) for row in TASK_VECTOR_ROWS),
        RAM,
        RAMPLUS_TL,
        SLERP,
        NUSLERP,
        MULTISLERP,
        KARCHER,
        MODEL_STOCK,
        NEARSWAP,
        ARCEE_FUSION,
        PASSTHROUGH,
    )
}

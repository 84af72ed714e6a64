"""Cross-check against mergekit 0.1.5, run from its own virtual environment.

Our recipes are meant to be mergekit's recipes: the same YAML must give the same tensors. Each
recipe below is merged once by mergekit's own command-line tools (``mergekit-multi`` runs all of
them in one process, so mergekit is imported once; ``mergekit-yaml`` is exercised once too) and
once by :func:`dammerge.merge`, and every output tensor is compared within float tolerance.

Only deterministic settings are compared: DARE and DELLA are checked at density 1 (no random
drop); breadcrumbs, whose band selection is deterministic, at density 1 and below; SCE, whose
top-variance selection is deterministic too, with and without selecting. Arcee Fusion's
quartiles are exact in both tools on tensors of up to 1M entries (mergekit samples larger
ones at random); the test family's tensors are far smaller. The gradient/filter
recipe pins down where each tensor sits on the depth axis, including tensors outside the blocks
(embeddings, final norm, ``lm_head``), which mergekit places at ``t = 0``.

Half precision (``dtype: float16`` / ``bfloat16``) is compared within one unit in the last place
(ulp) of the output dtype. mergekit computes linear and SLERP in float32 whatever ``dtype`` says,
so the same recipe is compared directly. Its task-arithmetic family (task_arithmetic, TIES,
breadcrumbs, DARE, DELLA), model_stock, and nuslerp, multislerp, karcher, nearswap,
arcee_fusion, ram and ramplus_tl compute in the half dtype itself, while dammerge
computes in float32 and rounds once; for those, mergekit is run in float32 on copies of the
checkpoints already rounded to the half dtype, and its output rounded once is what dammerge must
give. The only entries allowed to differ there are ties at the density cut: entries whose
magnitude equals the k-th largest one, where dammerge keeps the lower index and mergekit whatever
its unstable sort returns; and, for RAM, entries where the base cancels the merged change, so
that float32 rounding noise of the inputs' size exceeds a half ulp of the tiny result (see
``CANCELLATION_RECIPES``).

mergekit lives in ``.venv-mergekit`` (``make .venv-mergekit/.installed``, which ``make test``
builds); without it these tests fail rather than skip, so CI cannot pass them silently.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import dammerge
from dammerge.config import load_config
from dammerge.plan import build_plan
from dammerge.testing import make_lora_adapter, make_tiny_llava

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_BIN = REPO / ".venv-mergekit" / "bin"
RTOL, ATOL = 1e-5, 1e-6
HALF_DTYPES = ("float16", "bfloat16")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# mergekit options shared by every call: local folders only, CPU, no tokenizer/model card.
MERGEKIT_OPTIONS = ["--no-copy-tokenizer", "--no-write-model-card", "--lazy-unpickle", "--quiet"]

# Recipes use the placeholders BASE, FT0, FT1, FT2 for the tiny Llama family's folders.
RECIPES: dict[str, dict[str, Any]] = {
    "linear_weighted": {
        "merge_method": "linear",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.5}},
            {"model": "FT1", "parameters": {"weight": 0.3}},
            {"model": "FT2", "parameters": {"weight": 0.4}},
        ],
        "parameters": {"normalize": False},
    },
    "linear_normalize": {
        "merge_method": "linear",
        "models": [
            {"model": "FT0", "parameters": {"weight": 1.0}},
            {"model": "FT1", "parameters": {"weight": 2.0}},
            {"model": "FT2", "parameters": {"weight": 3.0}},
        ],
        "parameters": {"normalize": True},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.7}},
            {"model": "FT1", "parameters": {"weight": 0.4}},
            {"model": "FT2", "parameters": {"weight": -0.2}},
        ],
        "parameters": {"lambda": 0.8},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 0.5}},
            {"model": "FT2", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    },
    "ties_unnormalized_densities": {
        "merge_method": "ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": "FT1", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "parameters": {"normalize": False},
    },
    "slerp_scalar": {
        "merge_method": "slerp",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT0"}],
        "parameters": {"t": 0.35},
    },
    "slerp_gradient": {
        "merge_method": "slerp",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT1"}],
        "parameters": {"t": [0, 0.3, 0.7, 1]},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "BASE",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "BASE",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"filter_wise": True},
    },
    "dare_linear_density1": {
        "merge_method": "dare_linear",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 1.0}},
        ],
    },
    "dare_ties_density1": {
        "merge_method": "dare_ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 1.0}},
            {"model": "FT2", "parameters": {"weight": 0.5, "density": 1.0}},
        ],
    },
    "della_density1": {
        "merge_method": "della",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 1.0}},
        ],
    },
    "breadcrumbs_density1": {
        "merge_method": "breadcrumbs",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 1.0, "gamma": 0.0}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 1.0, "gamma": 0.0}},
        ],
    },
    # Breadcrumbs' band selection is deterministic: compare it where it actually selects.
    "breadcrumbs_band": {
        "merge_method": "breadcrumbs",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 0.5, "gamma": 0.1}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 0.3, "gamma": 0.05}},
        ],
    },
    "breadcrumbs_ties_band": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6, "density": 0.5, "gamma": 0.1}},
            {"model": "FT1", "parameters": {"weight": 0.3, "density": 0.6, "gamma": 0.02}},
            {"model": "FT2", "parameters": {"weight": 0.5, "density": 0.4, "gamma": 0.1}},
        ],
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "BASE",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
    },
    # SCE's top-variance selection is deterministic: compare it where it actually selects.
    "sce_select_topk": {
        "merge_method": "sce",
        "base_model": "BASE",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"select_topk": 0.3},
    },
    # Gradients and {filter, value} lists resolved per tensor. The lm_head/embed/norm entries
    # use steep gradients so that any disagreement about their depth position is large.
    "gradient_filters": {
        "merge_method": "task_arithmetic",
        "base_model": "BASE",
        "models": [
            {
                "model": "FT0",
                "parameters": {
                    "weight": [
                        {"filter": "self_attn", "value": [0.1, 0.9]},
                        {"filter": "mlp", "value": 0.5},
                        {"value": [1.0, 0.0]},
                    ]
                },
            },
            {"model": "FT1", "parameters": {"weight": [0.2, 0.8, 0.4]}},
            {
                "model": "FT2",
                "parameters": {"weight": [{"filter": "lm_head", "value": 0.9}]},
            },
        ],
        # FT2's filter list matches only lm_head; elsewhere the global default applies.
        "parameters": {"weight": [{"filter": "*", "value": [0.3, -0.3]}]},
    },
    # mergekit 0.1.5 matches a filter as a substring only: glob characters are literal, so
    # this filter matches no tensor and the default value applies everywhere.
    "filter_is_a_substring": {
        "merge_method": "task_arithmetic",
        "base_model": "BASE",
        "models": [
            {
                "model": "FT0",
                "parameters": {
                    "weight": [{"filter": "layers.1*mlp", "value": 0.9}, {"value": 0.2}]
                },
            },
            {"model": "FT1", "parameters": {"weight": 0.5}},
        ],
    },
    "ties_gradient_density": {
        "merge_method": "ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.5, "density": [0.2, 0.9]}},
            {"model": "FT1", "parameters": {"weight": [0.9, 0.1], "density": 0.6}},
        ],
    },
    # LazyMergekit's SLERP form: whole layer ranges as slices, per-filter t gradients.
    "slices_slerp_lazymergekit": {
        "merge_method": "slerp",
        "base_model": "BASE",
        "slices": [
            {
                "sources": [
                    {"model": "BASE", "layer_range": [0, 3]},
                    {"model": "FT0", "layer_range": [0, 3]},
                ]
            }
        ],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
    },
    # Sub-ranges: the gradient restarts in each slice (a one-layer slice sits at t = 1).
    "slices_slerp_subranges": {
        "merge_method": "slerp",
        "base_model": "BASE",
        "slices": [
            {
                "sources": [
                    {"model": "BASE", "layer_range": [0, 2]},
                    {"model": "FT1", "layer_range": [0, 2]},
                ]
            },
            {
                "sources": [
                    {"model": "BASE", "layer_range": [1, 2]},
                    {"model": "FT1", "layer_range": [1, 2]},
                ],
                "parameters": {"t": [0.3, 0.6]},
            },
            {
                "sources": [
                    {"model": "BASE", "layer_range": [1, 3]},
                    {"model": "FT1", "layer_range": [1, 3]},
                ]
            },
        ],
        "parameters": {"t": [0.1, 0.9]},
    },
    # Each slice from its own models: embeddings come from the first slice's, the final norm
    # and lm_head from the last slice's; source, slice and global parameters in that order.
    "slices_linear_multi": {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": "FT0", "layer_range": [0, 1], "parameters": {"weight": 0.3}},
                    {"model": "FT1", "layer_range": [0, 1]},
                ],
                "parameters": {"weight": 0.7},
            },
            {
                "sources": [
                    {"model": "FT1", "layer_range": [1, 3], "parameters": {"weight": [1, 3]}},
                    {"model": "FT2", "layer_range": [0, 2]},
                ]
            },
        ],
        "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
    },
    # A frankenmerge: overlapping ranges of two models stacked into five layers.
    "passthrough_frankenmerge": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "FT0", "layer_range": [0, 2]}]},
            {"sources": [{"model": "FT1", "layer_range": [1, 3]}]},
            {"sources": [{"model": "FT0", "layer_range": [2, 3]}]},
        ],
    },
    # Layer duplication with the duplicate's output projections zeroed by `scale`.
    "passthrough_scale": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "FT2", "layer_range": [0, 2]}]},
            {
                "sources": [{"model": "FT2", "layer_range": [1, 2]}],
                "parameters": {
                    "scale": [
                        {"filter": "o_proj", "value": 0.0},
                        {"filter": "down_proj", "value": 0.0},
                        {"value": 1.0},
                    ]
                },
            },
            {"sources": [{"model": "FT2", "layer_range": [2, 3]}]},
        ],
    },
    "passthrough_copy": {
        "merge_method": "passthrough",
        "models": [{"model": "FT1", "parameters": {"scale": 0.5}}],
    },
    # NuSLERP: on task vectors (flattened, the default), on rows without a base, and on
    # columns with weights summing to zero (t = 0.5), as mergekit's own tests run it.
    "nuslerp_task_vectors": {
        "merge_method": "nuslerp",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6}},
            {"model": "FT1", "parameters": {"weight": 0.4}},
        ],
    },
    "nuslerp_rows": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.3}},
            {"model": "FT1", "parameters": {"weight": 0.7}},
        ],
        "parameters": {"nuslerp_flatten": False},
    },
    "nuslerp_columns_zero_sum": {
        "merge_method": "nuslerp",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": -0.5}},
            {"model": "FT1", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.5}},
            {"model": "FT1", "parameters": {"weight": 0.3}},
            {"model": "FT2", "parameters": {"weight": 0.2}},
        ],
    },
    "multislerp_no_base": {
        "merge_method": "multislerp",
        "models": [
            {"model": "FT0", "parameters": {"weight": 1.0}},
            {"model": "FT1", "parameters": {"weight": 2.0}},
        ],
        "parameters": {"normalize_weights": False},
    },
    # mergekit's own karcher test: the base, not listed, is merged as a third model, and the
    # weights karcher does not use are ignored.
    "karcher_with_base": {
        "merge_method": "karcher",
        "base_model": "BASE",
        "models": [
            {"model": "FT0", "parameters": {"weight": 0.6}},
            {"model": "FT1", "parameters": {"weight": 0.4}},
        ],
        "parameters": {"max_iter": 5, "tol": 1e-5},
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
    },
    # t near the task vectors' typical magnitude: some entries swap, others move by t.
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT0"}],
        "parameters": {"t": 0.01},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT1"}],
    },
    # epsilon near the task vectors' magnitude: entries changed by none, one and several models.
    "ram": {
        "merge_method": "ram",
        "base_model": "BASE",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"epsilon": 0.01},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "BASE",
        "models": [{"model": "FT0"}, {"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 1.0},
    },
}


# mergekit computes these in float32 whatever `dtype` says: the same half-precision recipe is
# compared directly. The others it computes in the half dtype (see the module docstring).
UPCAST_RECIPES = (
    "linear_weighted",
    "linear_normalize",
    "slerp_scalar",
    "slerp_gradient",
    "slices_slerp_lazymergekit",
    "slices_slerp_subranges",
    "slices_linear_multi",
    "passthrough_frankenmerge",
    "passthrough_scale",
    "passthrough_copy",
)
HALF_COMPUTED_RECIPES = tuple(name for name in RECIPES if name not in UPCAST_RECIPES)
# Recipes that select by magnitude rank below density 1: ties at the cut may differ.
CUT_RECIPES = {
    "ties",
    "ties_unnormalized_densities",
    "ties_gradient_density",
    "breadcrumbs_band",
    "breadcrumbs_ties_band",
}

# RAM averages the changes of several models: mergekit divides each change by the count and then
# sums, dammerge sums and then divides, both in float32. Where the base nearly cancels the mean
# change (the exact result 0 or tiny), those few float32 ulps of the inputs' magnitude are many
# ulps of the tiny half-precision result: dammerge's is the closer one (the exact 0 where the
# inputs cancel exactly). Only such entries may differ by more than one ulp.
CANCELLATION_RECIPES = {"ram", "ramplus_tl"}
CANCELLATION_ULPS = 4  # float32 ulps of the largest input magnitude at the entry


@pytest.fixture(scope="session")
def family_paths(llama_family) -> dict[str, str]:
    base, variants = llama_family
    return {"BASE": str(base), **{f"FT{i}": str(v) for i, v in enumerate(variants)}}


def rounded_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of checkpoint folder ``src`` with its float tensors stored in ``dtype``."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    for shard in src.glob("*.safetensors"):
        state = {
            name: t.to(dtype) if t.is_floating_point() else t
            for name, t in load_file(shard).items()
        }
        save_file(state, dst / shard.name, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def rounded_family_paths(family_paths, tmp_path_factory) -> dict[str, dict[str, str]]:
    """For each half dtype, the family's checkpoints stored already rounded to it."""
    root = tmp_path_factory.mktemp("rounded")
    return {
        dtype: {
            key: str(rounded_copy(Path(path), root / dtype / key, HALF[dtype]))
            for key, path in family_paths.items()
        }
        for dtype in HALF_DTYPES
    }


def fill_paths(
    recipe: dict[str, Any], paths: dict[str, str], dtype: str = "float32"
) -> dict[str, Any]:
    """The recipe with placeholders replaced by folders, computed with ``dtype``."""
    filled = copy.deepcopy(recipe)
    if "base_model" in filled:
        filled["base_model"] = paths[filled["base_model"]]
    sources = [s for out_slice in filled.get("slices", []) for s in out_slice["sources"]]
    for entry in [*filled.get("models", []), *sources]:
        entry["model"] = paths[entry["model"]]
    filled["dtype"] = dtype
    return filled


def mergekit_tool(name: str) -> Path:
    tool = MERGEKIT_BIN / name
    if not tool.is_file():
        pytest.fail(
            f"mergekit 0.1.5 is not installed ({tool} missing): run "
            "`make .venv-mergekit/.installed` (`make test` builds it)",
            pytrace=False,
        )
    return tool


def run_mergekit(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"mergekit failed ({done.returncode}):\n{done.stderr[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def mergekit_outputs(family_paths, rounded_family_paths, tmp_path_factory) -> dict[str, Path]:
    """Every recipe merged by mergekit in one ``mergekit-multi`` process."""
    tool = mergekit_tool("mergekit-multi")
    work = tmp_path_factory.mktemp("mergekit")
    # Names get a prefix: mergekit-multi treats any string equal to a merge's name as a
    # reference to that merge, and a name equal to its own merge_method would depend on itself.
    cases = {name: fill_paths(r, family_paths) for name, r in RECIPES.items()}
    for dtype in HALF_DTYPES:
        for name in UPCAST_RECIPES:
            cases[f"{name}-{dtype}"] = fill_paths(RECIPES[name], family_paths, dtype)
        for name in HALF_COMPUTED_RECIPES:
            cases[f"{name}-{dtype}-inputs"] = fill_paths(RECIPES[name], rounded_family_paths[dtype])
    documents = [{"name": f"recipe-{case}", **recipe} for case, recipe in cases.items()]
    config = work / "recipes.yml"
    config.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    out = work / "out"
    run_mergekit([str(tool), str(config), "-I", str(out), "--no-lazy", *MERGEKIT_OPTIONS])
    return {case: out / f"recipe-{case}" for case in cases}


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert tensors, f"no safetensors in {folder}"
    return tensors


def assert_same_layer_count(ours: Path, theirs: Path) -> None:
    counts = [
        json.loads((f / "config.json").read_text())["num_hidden_layers"] for f in (ours, theirs)
    ]
    assert counts[0] == counts[1], f"num_hidden_layers {counts[0]} vs mergekit's {counts[1]}"


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    assert_same_layer_count(ours, theirs)
    a, b = load_tensors(ours), load_tensors(theirs)
    assert sorted(a) == sorted(b), "the two tools wrote different tensor names"
    mismatched = []
    for name in sorted(a):
        assert a[name].dtype == b[name].dtype, f"{name}: {a[name].dtype} vs {b[name].dtype}"
        if not torch.allclose(a[name], b[name], rtol=RTOL, atol=ATOL):
            diff = (a[name].double() - b[name].double()).abs().max().item()
            mismatched.append(f"{name} (max |diff| {diff:.3g})")
    assert not mismatched, f"{len(mismatched)} tensors differ from mergekit: {mismatched[:6]}"


INT_VIEW = {2: torch.int16, 4: torch.int32}  # a float dtype's bits, by its size in bytes


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared: half or float32) dtype lie between
    ``a`` and ``b``, entry by entry: 0 when equal, 1 for neighbours (+0 and -0 count as
    equal)."""
    assert a.dtype == b.dtype and a.dtype.is_floating_point and a.element_size() in INT_VIEW
    sign = 2 ** (8 * a.element_size() - 1)

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(INT_VIEW[x.element_size()]).long()
        return torch.where(bits < 0, -sign - bits, bits)

    return (ordered(a) - ordered(b)).abs()


def cut_ties(recipe: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per tensor, where some model's task vector (inputs rounded to ``dtype``) has a magnitude
    equal to one of its selection cuts: the k-th largest magnitude for TIES, the two band
    edges for breadcrumbs. Written independently of dammerge's selection code; only the
    per-tensor density/gamma come from dammerge's plan."""
    plan = build_plan(load_config(recipe))
    assert plan.base is not None
    tied: dict[str, torch.Tensor] = {}
    for tensor in plan.tensors:
        base = plan.base.get(tensor.name).to(dtype).float().reshape(-1)
        hits = torch.zeros(base.numel(), dtype=torch.bool)
        for ck, params in zip(plan.participants, tensor.model_params, strict=True):
            magnitude = (ck.get(tensor.name).to(dtype).float().reshape(-1) - base).abs()
            n = magnitude.numel()
            keep = int(params["density"] * n)
            top = min(int(params.get("gamma", 0.0) * n), n - keep)
            ranked = torch.sort(magnitude, descending=True).values
            for k in {keep + top, top} - {0, n + 1}:
                if k <= n:
                    hits |= magnitude == ranked[k - 1]
        tied[tensor.name] = hits.view(tensor.shape)
    return tied


def cancellations(
    recipe: dict[str, Any], ours: Path, theirs: Path, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Per tensor, where ``ours`` and mergekit's float32 result differ by at most
    ``CANCELLATION_ULPS`` float32 ulps of the largest input magnitude (inputs rounded to
    ``dtype``) at that entry: rounding noise, larger than a half-precision ulp only where the
    result is tiny next to its inputs."""
    plan = build_plan(load_config(recipe))
    a, b = load_tensors(ours), load_tensors(theirs)
    inputs = [ck for ck in (plan.base, *plan.participants) if ck is not None]
    noise: dict[str, torch.Tensor] = {}
    for tensor in plan.tensors:
        scale = torch.stack([ck.get(tensor.name).to(dtype).float().abs() for ck in inputs])
        bound = CANCELLATION_ULPS * 2.0**-24 * scale.amax(dim=0)
        noise[tensor.name] = (a[tensor.name].float() - b[tensor.name].float()).abs() <= bound
    return noise


def assert_within_one_ulp(
    ours: Path, theirs: Path, dtype: torch.dtype, allowed: dict[str, torch.Tensor] | None = None
) -> None:
    """Every entry of ``ours`` within one ulp of ``theirs`` rounded to ``dtype``, except where
    ``allowed`` marks it (ties at the density cut, or cancellation noise)."""
    assert_same_layer_count(ours, theirs)
    a, b = load_tensors(ours), load_tensors(theirs)
    assert sorted(a) == sorted(b), "the two tools wrote different tensor names"
    problems, excused, total = [], 0, 0
    for name in sorted(a):
        assert a[name].dtype == dtype, f"{name} written as {a[name].dtype}"
        far = ulp_distance(a[name], b[name].to(dtype)) > 1
        total += far.numel()
        if allowed is not None:
            excused += int((far & allowed[name]).sum())
            far &= ~allowed[name]
        if far.any():
            problems.append(f"{name} ({int(far.sum())} entries)")
    assert not problems, f"{len(problems)} tensors differ by > 1 ulp: {problems[:6]}"
    assert excused <= total // 100, f"{excused}/{total} entries differ where excused"


@pytest.mark.parametrize("name", list(RECIPES))
def test_same_tensors_as_mergekit(name, family_paths, mergekit_outputs, tmp_path):
    ours = dammerge.merge(fill_paths(RECIPES[name], family_paths), tmp_path / name, progress=False)
    assert_same_tensors(ours, mergekit_outputs[name])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", UPCAST_RECIPES)
def test_half_precision_upcast_methods_match_mergekit(
    name, dtype, family_paths, mergekit_outputs, tmp_path
):
    """Linear and SLERP: the same half-precision recipe, within one ulp of mergekit's."""
    recipe = fill_paths(RECIPES[name], family_paths, dtype)
    ours = dammerge.merge(recipe, tmp_path / name, progress=False)
    assert_within_one_ulp(ours, mergekit_outputs[f"{name}-{dtype}"], HALF[dtype])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", HALF_COMPUTED_RECIPES)
def test_half_precision_is_mergekits_float32_result_rounded_once(
    name, dtype, family_paths, mergekit_outputs, tmp_path
):
    """dammerge's ``dtype: <half>`` result is mergekit's float32 arithmetic on the same rounded
    inputs, rounded once: within one ulp, ties at the density cut excepted."""
    recipe = fill_paths(RECIPES[name], family_paths, dtype)
    ours = dammerge.merge(recipe, tmp_path / name, progress=False)
    theirs = mergekit_outputs[f"{name}-{dtype}-inputs"]
    allowed = cut_ties(recipe, HALF[dtype]) if name in CUT_RECIPES else None
    if name in CANCELLATION_RECIPES:
        allowed = cancellations(recipe, ours, theirs, HALF[dtype])
    assert_within_one_ulp(ours, theirs, HALF[dtype], allowed)


def test_recipe_file_through_mergekit_yaml(family_paths, tmp_path):
    """The canonical command, on one YAML file that both tools read as it is."""
    tool = mergekit_tool("mergekit-yaml")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(fill_paths(RECIPES["ties"], family_paths)))
    run_mergekit([str(tool), str(recipe), str(tmp_path / "mergekit"), *MERGEKIT_OPTIONS])
    ours = dammerge.merge(recipe, tmp_path / "ours", progress=False)
    assert_same_tensors(ours, tmp_path / "mergekit")


def test_outside_block_tensors_take_the_first_gradient_value(family_paths, tmp_path):
    """mergekit places embeddings, the final norm and lm_head at t = 0 (the first value).

    Checked directly against a hand computation, independent of mergekit, so the meaning of
    a gradient for these tensors is pinned even where the venv comparison is not run.
    """
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "BASE",
        "models": [{"model": "FT0", "parameters": {"weight": [1.0, 0.0]}}],
    }
    out = dammerge.merge(fill_paths(recipe, family_paths), tmp_path / "out", progress=False)
    merged = load_tensors(out)
    base = load_tensors(Path(family_paths["BASE"]))
    ft0 = load_tensors(Path(family_paths["FT0"]))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], ft0[name], rtol=RTOL, atol=ATOL)
    last = max(int(n.split(".")[2]) for n in base if n.startswith("model.layers."))
    name = f"model.layers.{last}.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], base[name], rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def lora_adapter(family_paths, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter of the tiny base (saved by peft, random non-zero factors)."""
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    targets = ("q_proj", "v_proj", "down_proj")
    return make_lora_adapter(family_paths["BASE"], folder, target_modules=targets, r=4)


@pytest.mark.parametrize("dtype", ["float32", *HALF_DTYPES])
def test_lora_references_match_mergekit(dtype, family_paths, lora_adapter, tmp_path):
    """``base+adapter``: mergekit folds the adapter with peft into its LoRA cache, dammerge while
    reading; the merged tensors must agree (exactly in float32, within one ulp in half)."""
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": f"{family_paths['BASE']}+{lora_adapter}", "parameters": {"weight": 0.6}},
            {"model": family_paths["FT0"], "parameters": {"weight": 0.4}},
        ],
        "dtype": dtype,
    }
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe))
    theirs = tmp_path / "mergekit"
    cache = ["--lora-merge-cache", str(tmp_path / "lora-cache")]
    tool = mergekit_tool("mergekit-yaml")
    run_mergekit([str(tool), str(config), str(theirs), *cache, *MERGEKIT_OPTIONS])
    ours = dammerge.merge(config, tmp_path / "ours", progress=False)
    assert ours is not None
    if dtype == "float32":
        assert_same_tensors(ours, theirs)
    else:
        assert_within_one_ulp(ours, theirs, HALF[dtype])


# mergekit's own test configurations (tests/test_basic_merges.py, test_tokenizer.py) merge
# independently initialised models: far from parallel, so many output entries are sums of terms
# that nearly cancel, and any step rounded otherwise (a float64 coefficient, a fused
# multiply-add, weights normalised in float64) moved such entries by up to 2^18 ulp in float32.
# Arcee Fusion takes B + (W − B) where the change is an outlier: with W unrelated to B, that
# float32 sum is W rounded at B's scale, thousands of W's ulps from W itself.
UNRELATED_RECIPES = {
    "slerp": {"base_model": "A", "parameters": {"t": 0.5}},
    "multislerp": {"base_model": "C"},
    "arcee_fusion": {"base_model": "A"},
}


@pytest.mark.parametrize("method", list(UNRELATED_RECIPES))
def test_unrelated_models_match_in_float32(method, tmp_path):
    """mergekit's SLERP (``test_slerp_union``), Multi-SLERP (``test_multislerp_merge``) and
    Arcee Fusion (``test_arcee_fusion_merge``: the unused weights are ignored) test
    configurations, on independently initialised models, in float32: within one ulp."""
    from dammerge.testing import make_tiny_model

    paths = {
        name: str(make_tiny_model(tmp_path / name, seed=seed)) for seed, name in enumerate("ABC")
    }
    recipe = {
        "merge_method": method,
        "models": [
            {"model": paths["A"], "parameters": {"weight": 0.6}},
            {"model": paths["B"], "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
        **UNRELATED_RECIPES[method],
    }
    recipe["base_model"] = paths[recipe["base_model"]]
    if method == "slerp":
        for entry in recipe["models"]:
            entry.pop("parameters")
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    tool = mergekit_tool("mergekit-yaml")
    run_mergekit([str(tool), str(path), str(tmp_path / "mergekit"), *MERGEKIT_OPTIONS])
    ours = dammerge.merge(path, tmp_path / "ours", progress=False)
    a, b = load_tensors(ours), load_tensors(tmp_path / "mergekit")
    assert sorted(a) == sorted(b)
    for name in a:
        # float32 ulps: the distance between the two values' ordered integer encodings
        bits = [t.view(torch.int32).long() for t in (a[name], b[name])]
        ordered = [torch.where(x < 0, -(2**31) - x, x) for x in bits]
        distance = (ordered[0] - ordered[1]).abs()
        assert int(distance.max()) <= 1, f"{name}: {int((distance > 1).sum())} entries > 1 ulp"


def loaded_by_transformers(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as transformers loads them (mergekit stores a LLaVA under
    transformers 5's key layout, dammerge under the input's), without those it initialised."""
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype="auto", output_loading_info=True
    )
    missing = set(info["missing_keys"])
    return {n: t.detach() for n, t in model.state_dict().items() if n not in missing}


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_row_wise_on_a_convolution_kernel_matches_mergekit(with_base, tmp_path):
    """mergekit's ``test_nuslerp_VLM_merges`` configuration with ``nuslerp_row_wise`` and
    without ``nuslerp_flatten``, in float32, on unrelated LLaVA models: on the vision tower's
    4-D convolution kernel the output channels are interpolated, and every entry is within one
    ulp of mergekit's (its float32 sums are taken in the same order)."""
    paths = {name: make_tiny_llava(tmp_path / name, seed) for seed, name in enumerate("ABC")}
    recipe: dict[str, Any] = {
        "merge_method": "nuslerp",
        "models": [
            {"model": paths["A"], "parameters": {"weight": 0.6}},
            {"model": paths["B"], "parameters": {"weight": 0.4}},
        ],
        "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False},
        "dtype": "float32",
    }
    if with_base:
        recipe["base_model"] = paths["C"]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    tool = mergekit_tool("mergekit-yaml")
    run_mergekit([str(tool), str(path), str(tmp_path / "mergekit"), *MERGEKIT_OPTIONS])
    ours = dammerge.merge(path, tmp_path / "ours", progress=False)
    assert ours is not None
    a, b = loaded_by_transformers(ours), loaded_by_transformers(tmp_path / "mergekit")
    assert any(t.dim() == 4 for t in b.values())  # the kernel is among those mergekit wrote
    for name in b:
        distance = ulp_distance(a[name], b[name])
        assert int(distance.max()) <= 1, f"{name}: {int((distance > 1).sum())} entries > 1 ulp"

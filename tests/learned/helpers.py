"""Helpers shared by the learned-merge tests (CPU and CUDA): token ids, building a merged model
over a fixture family, a training plan from a recipe, and the forward KL from its definition."""

from __future__ import annotations

import torch

from dammerge.checkpoint.reader import Checkpoint
from dammerge.learned.model import MergeOptions, build_merged_model
from dammerge.learned.run import prepare
from dammerge.registry import load_recipe

IDS = torch.tensor([[1, 5, 7, 9, 11, 40, 3], [2, 8, 100, 4, 6, 12, 13]])
ALL_MERGED = MergeOptions(merge_embeddings=True, merge_norms=True)
DEEP_LAYERS = 4  # the deep family's layers: layer streaming keeps two resident, fewer than all


def build_merged(family, options=None, **kwargs):
    """The merged model over a fixture family ``(base, sources)``."""
    base, sources = family
    return build_merged_model(
        Checkpoint(base), [Checkpoint(s) for s in sources], options or MergeOptions(), **kwargs
    )


def training_plan(dam_recipe, family, data, out, method="dam", device="cpu", **training):
    """A prepared plan of a ``method`` recipe over a fixture family and the datasets folder."""
    recipe = dam_recipe(family[0], family[1], data, **training)
    recipe["merge_method"] = method
    return prepare_recipe(recipe, out, device=device)


def prepare_recipe(recipe: dict, out, **kwargs):
    """The learned engine's prepared plan of a recipe dict, validated as the registry does."""
    validated = load_recipe(recipe)
    return prepare(validated.config, validated.settings, out, **kwargs)


def naive_forward_kl(merged: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · mean over rows of Σ p (log p − log q), straight from the definition (autograd)."""
    log_p = torch.log_softmax(teacher / temp, dim=-1)
    log_q = torch.log_softmax(merged / temp, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temp**2


def merged_weight_through(passes, scales: torch.Tensor, weights: torch.Tensor, dtype):
    """The merged weight a set of store passes forms, read through its layer forward: the
    identity through ``linear`` is ``Wᵀ`` exactly (each output one product with 1)."""
    eye = torch.eye(weights.shape[2], dtype=dtype, device=weights.device)
    return passes.linear(eye, scales, weights, None).T


def column_grads_through(passes, g2, x2, scales: torch.Tensor, weights: torch.Tensor):
    """The coefficient gradients a set of store passes gives, read through its layer backward."""
    return passes.backward(g2, x2, scales, weights, False, True)[1]

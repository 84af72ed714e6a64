"""``training.distributed: shard``: the merge module split over the ranks with FSDP2.

The weight stores are what outgrow a device (N copies of every linear), so they are sharded
along a *weight* axis: rank r of K holds rows ``[r·⌈R/K⌉, (r+1)·⌈R/K⌉)`` of every source's
tensor (R its first dimension: output features, vocabulary, hidden size), never whole sources.
Each decoder layer is one ``fully_shard`` group (gathered for its forward and again for its
backward, then freed); an untied ``lm_head`` is another; the root group holds the rest: the
embedding, the final norm and, for tied models, the head that reads the embedding, so the
embedding and a tied head share one group.

Nothing is loaded whole on any rank: the module is built on the meta device, sharded, given
memory for its local shards only, and each rank reads exactly its rows of every tensor from
the safetensors files (:meth:`~dammerge.checkpoint.reader.Checkpoint.get_rows`).

The coefficients are not sharded (``ignored_params``): they are small (one row per source per
input column), stay whole on every rank, and their gradients are all-reduced like
``replicate``'s, so both strategies train, check and checkpoint the same way.

With ``training.offload: layers`` as well, each decoder layer's group keeps its shards in host
memory (FSDP2's ``CPUOffloadPolicy``; pinned on CUDA): a layer's forward copies this rank's rows
to the device and gathers the whole layer there, and frees it after the forward and again after
the backward, so the device holds the gathered layers only while they compute (the current one
and the one prefetched) and host memory 1/K of the stores. The stores are frozen, so no
gradient goes through host memory; the coefficients are ignored by FSDP and stay on the device.

FSDP2 splits a tensor unevenly only along dimension 0, and a store's weight axis is dimension 1
(``(N, rows, ...)``): a store whose rows do not divide by K gets zero rows of padding up to the
next multiple (at most K − 1 rows), which the merge modules leave out when they read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dammerge.checkpoint.reader import Checkpoint
from dammerge.errors import CheckpointError
from dammerge.learned.distributed import Distributed
from dammerge.learned.layers import MergedLinear, MergedParameterModule
from dammerge.learned.model import MergedModel, MergeOptions, _Builder


class _ShardedBuilder(_Builder):
    """Builds the merge module on the meta device, stores padded to a multiple of K rows."""

    shares_base_rows = False  # the base's tensor is its own (sharded) parameter

    def __init__(self, *args: Any, world_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.world_size = world_size

    def _store(self, tensor_name: str) -> torch.Tensor:
        rows, *rest = self.base.shape(tensor_name)
        padded = math.ceil(rows / self.world_size) * self.world_size
        return torch.empty((len(self.store), padded, *rest), device="meta", dtype=self.dtype)

    def _base_tensor(self, tensor_name: str) -> torch.Tensor:
        return torch.empty(self.base.shape(tensor_name), device="meta", dtype=self.dtype)

    def _place(self, model: nn.Module) -> None:
        for module in model.modules():  # parameters stay on meta until sharded
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)


def build_sharded_model(
    base: Checkpoint,
    sources: list[Checkpoint],
    options: MergeOptions,
    *,
    ranks: Distributed,
    dtype: torch.dtype,
    keep_teacher_weights: bool,
    seed: int,
    offload: bool = False,
) -> MergedModel:
    """This rank's shard of the merge module (see the module docstring); ``offload`` keeps
    the decoder layers' shards in host memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard

    builder = _ShardedBuilder(
        base,
        sources,
        options,
        ranks.device,
        dtype,
        keep_teacher_weights,
        seed,
        world_size=ranks.world_size,
    )
    model = builder.build()
    stores = {id(entry.param) for entry in _stores(model).values()}
    ignored = set(model.coefficient_parameters())

    def placement(param: nn.Parameter) -> Shard:
        return Shard(1) if id(param) in stores else Shard(0)

    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    shard = {"mesh": mesh, "shard_placement_fn": placement, "ignored_params": ignored}
    layers = _decoder_layers(model, base)
    in_host = {"offload_policy": CPUOffloadPolicy(pin_memory=ranks.device.type == "cuda")}
    for layer in layers:
        fully_shard(layer, **shard, **(in_host if offload else {}))
    head = model.model.get_output_embeddings()
    if isinstance(head, MergedLinear):
        fully_shard(head, **shard)
    fully_shard(model, **shard)
    _allocate(model, ranks.device, host_modules=list(layers) if offload else [])
    _fill(model, base, builder.store, ranks)
    return model


def _decoder_layers(model: MergedModel, base: Checkpoint) -> nn.ModuleList:
    count = base.architecture.num_layers
    for module in model.model.modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count:
            return module
    raise CheckpointError(
        f"cannot find the {count} decoder layers of {base.path} to shard",
        "training.distributed: shard supports standard decoder-only Hugging Face models; "
        "use replicate for this one",
    )


def _allocate(
    model: MergedModel, device: torch.device, host_modules: list[nn.Module] | None = None
) -> None:
    """Memory for this rank's shards: on ``device``, or in host memory for the shards of
    ``host_modules`` (offloaded groups); the coefficients and buffers keep their values and
    stay on ``device``."""
    kept = {
        name: tensor.detach().clone()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if not tensor.is_meta and not _is_sharded(tensor)
    }
    model.to_empty(device=device)
    for module in host_modules or []:
        for param in module.parameters():
            if _is_sharded(param):
                param.data = torch.empty_like(param, device="cpu")
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in kept.items():
            state[name].copy_(value)


@dataclass(frozen=True)
class _Store:
    """A stacked store parameter, the checkpoint tensor it stacks and that tensor's rows."""

    param: nn.Parameter
    tensor: str
    rows: int


def _stores(model: MergedModel) -> dict[str, _Store]:
    """Every stacked store of the merge module by parameter name."""
    out: dict[str, _Store] = {}
    for name, module in model.named_modules():
        tensor_prefix = name.removeprefix("model.")  # the HF model sits at ``model``
        if isinstance(module, MergedLinear):
            rows = module.out_features
            out[f"{name}.weights"] = _Store(module.weights, f"{tensor_prefix}.weight", rows)
            if module.biases is not None:
                out[f"{name}.biases"] = _Store(module.biases, f"{tensor_prefix}.bias", rows)
        elif isinstance(module, MergedParameterModule):
            for stacked in module.stack_names:
                out[f"{name}.stack_{stacked}"] = _Store(
                    getattr(module, f"stack_{stacked}"),
                    f"{tensor_prefix}.{stacked}",
                    module.stack_rows[stacked],
                )
    return out


def _base_tensor_name(param_name: str) -> str:
    """The checkpoint name of a parameter that holds one base tensor."""
    name = param_name.removeprefix("model.")
    module, _, leaf = name.rpartition(".")
    return f"{module.removesuffix('.inner')}.{leaf}"


@torch.no_grad()
def _fill(
    model: MergedModel, base: Checkpoint, store: list[Checkpoint], ranks: Distributed
) -> None:
    """Read this rank's rows of every sharded tensor straight from the files."""
    stores = _stores(model)
    for name, param in model.named_parameters():
        if not _is_sharded(param):
            continue
        local = param.to_local()
        stacked = stores.get(name)
        dim = 1 if stacked is not None else 0
        first, last = _rows_of(param.shape[dim], ranks)
        if local.shape[dim] != last - first:
            raise RuntimeError(f"{name}: FSDP gave rank {ranks.rank} an unexpected shard")
        if stacked is None:
            local.copy_(base.get_rows(_base_tensor_name(name), first, last).to(local.dtype))
            continue
        local.zero_()  # padding rows stay zero
        for row, checkpoint in enumerate(store):
            part = checkpoint.get_rows(stacked.tensor, first, min(last, stacked.rows))
            local[row, : part.shape[0]].copy_(part.to(local.dtype))


def _rows_of(rows: int, ranks: Distributed) -> tuple[int, int]:
    """``[first, last)`` rows of a dimension FSDP gives this rank (``torch.chunk``'s split)."""
    chunk = math.ceil(rows / ranks.world_size)
    first = min(rows, ranks.rank * chunk)
    return first, min(rows, first + chunk)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def held_store_bytes(model: MergedModel) -> dict[str, float]:
    """What this rank holds of the weight stores, measured from the tensors' storage.

    ``held``: bytes of this rank's stores (its shards' storage when sharded, padding
    included); ``full``: bytes of the whole stores (without padding); ``largest_share``: the
    largest fraction of any one store this rank holds.
    """
    held = full = 0
    largest = 0.0
    for entry in _stores(model).values():
        param = entry.param
        whole = param.numel() // param.shape[1] * entry.rows * param.element_size()
        if _is_sharded(param):
            mine = param.to_local().untyped_storage().nbytes()
        else:
            mine = param.numel() * param.element_size()
        held, full = held + mine, full + whole
        largest = max(largest, mine / whole if whole else 0.0)
    return {"held": held, "full": full, "largest_share": largest}

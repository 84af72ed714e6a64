"""The merge module under FSDP (``torch.distributed.fsdp.fully_shard``): two CPU ranks over gloo.

The merge module is meant to stay an ordinary ``nn.Module`` so that FSDP can shard it across
devices and nodes once models outgrow one. This shards it for real: every block linear is its
own FSDP group (its weight store and coefficients split across the ranks), the root holds the
rest; each rank then keeps only its part of every store, and one forward and backward gives the
coefficient gradients, and teacher mode the logits, of the unsharded module.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dammerge.checkpoint.reader import Checkpoint
from dammerge.learned.layers import MergedLinear
from dammerge.learned.model import MergedModel, MergeOptions, build_merged_model

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _coefficient_grads(model: MergedModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a fixed, token-weighted log-likelihood with respect to every coefficient."""
    model.zero_grad(set_to_none=True)
    log_probs = model(ids).log_softmax(-1)
    weights = torch.rand(log_probs.shape, generator=torch.Generator().manual_seed(7))
    (log_probs * weights).sum().backward()
    return {name: _full(p.grad).detach().clone() for name, p in model.coefficient_groups()}


def _rank(rank: int, port: int, base: str, sources: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = build_merged_model(
            Checkpoint(Path(base)),
            [Checkpoint(Path(s)) for s in sources],
            MergeOptions(init="random", merge_norms=True),
        )
        ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(3))
        expected = _coefficient_grads(model, ids)
        with torch.no_grad(), model.teacher(1):
            teacher_expected = model(ids)
        linears = [m for _, m in model.merge_modules() if isinstance(m, MergedLinear)]
        full_rows = [m.weights.shape[0] for m in linears]
        mesh = init_device_mesh("cpu", (WORLD,))
        for module in linears:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local_rows = [m.weights.to_local().shape[0] for m in linears]
        got = _coefficient_grads(model, ids)
        with torch.no_grad(), model.teacher(1):
            teacher_got = model(ids)
        torch.save(
            {
                "sharded": all(isinstance(m.weights, DTensor) for m in linears),
                "full_rows": full_rows,
                "local_rows": local_rows,
                "expected": expected,
                "got": got,
                "teacher_expected": teacher_expected,
                "teacher_got": teacher_got,
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_shards_the_weight_stores_and_keeps_the_gradients(untied_family, tmp_path):
    base, sources = untied_family
    args = (_free_port(), str(base), [str(s) for s in sources], str(tmp_path))
    mp.spawn(_rank, args=args, nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["sharded"]
        # two sources per store, split over two ranks: each rank holds one source's rows
        assert result["local_rows"] == [rows // WORLD for rows in result["full_rows"]]
        assert result["expected"].keys() == result["got"].keys()
        for name, grad in result["expected"].items():
            torch.testing.assert_close(result["got"][name], grad, msg=name)
        torch.testing.assert_close(result["teacher_got"], result["teacher_expected"])

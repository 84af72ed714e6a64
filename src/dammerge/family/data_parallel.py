"""Data-parallel training of one family model: every batch split across worker processes.

Why: a step of a model this small is matrix products of a few hundred rows, which a second
thread speeds up little, while two processes of one thread each, each on half of the batch,
keep two cores busy. Pre-training and the near regime's warm start train a single model, so
they cannot run side by side as the specialists do; splitting each batch does the same for them.

torch.distributed's ``DistributedDataParallel`` sums the ranks' gradients (gloo, rendezvous
through a file store in a temporary folder: no port, nothing leaves the machine). Every rank
draws the same batch stream and takes rows ``rank, rank + ranks, ...`` of each batch (the family's
batches are sorted by length, so interleaved rows share the work evenly). Its loss is weighted by
its share of the batch's labelled tokens, so the summed gradient is that of the whole batch's
mean loss, as one process computes it. Each rank runs one thread: the trained weights depend on
the number of ranks, never on how many CPUs the machine has.
"""

from __future__ import annotations

import io
import multiprocessing
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dammerge.family.train import IGNORE_INDEX, Batch, LossFn, Schedule, run_steps

# A step takes well under a second; a rank that waits this long for the others has lost them.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)

BatchStream = Callable[[], Iterator[Batch]]


def train_steps(
    model: torch.nn.Module,
    batches: BatchStream,
    schedule: Schedule,
    description: str,
    loss_fn: LossFn,
    ranks: int = 1,
    position: int | None = None,
) -> list[float]:
    """Train ``model`` in place for ``schedule.steps`` batches of ``batches()``; returns every
    step's loss (the whole batch's mean). ``ranks`` of 1 trains in this process on its threads;
    more split each batch across that many worker processes (see the module docstring).
    ``position``: the progress bar's line, where several trainings run at once.

    ``batches`` is a picklable callable (a ``functools.partial`` of a module-level function), so
    that every rank can draw the same stream."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    if ranks == 1:
        return run_steps(model, batches(), schedule, description, loss_fn, position)
    # spawn, not fork: a child forked from a process whose OpenMP pool is running can hang
    context = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="dammerge-ranks-") as folder,
        ProcessPoolExecutor(ranks, mp_context=context) as pool,
    ):
        store = str(Path(folder) / "store")
        sent = _serialised(model)
        futures = [
            pool.submit(
                _rank, rank, ranks, store, sent, batches, schedule, description, loss_fn, position
            )
            for rank in range(ranks)
        ]
        results = [future.result() for future in futures]
    state, losses = _deserialised(results[0])
    model.load_state_dict(state)
    model.eval()
    return losses


def shard(batch: Batch, rank: int, ranks: int) -> Batch:
    """Rows ``rank, rank + ranks, ...`` of ``batch``, right padding beyond their longest row cut."""
    part = {key: value[rank::ranks] for key, value in batch.items()}
    if "attention_mask" in part:
        width = int(part["attention_mask"].sum(dim=1).max())
        part = {key: value[:, :width] for key, value in part.items()}
    return part


def predicted_tokens(batch: Batch) -> int:
    """How many labels the batch's loss averages over (a label is predicted from the position
    before it, so the first column's labels never count)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class _LossOf(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module's forward, so that DistributedDataParallel sees the
    forward pass it synchronises the backward pass of."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _serialised(value: Any) -> bytes:
    """``value`` as plain bytes. Tensors pickled between processes otherwise travel as shared
    memory whose file descriptors are handed over by a helper thread of the sender; plain bytes
    cannot leave two ranks stepping one storage, nor wait on a sender that has moved on."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _deserialised(data: bytes) -> Any:
    # our own bytes, made a moment ago by the parent or rank 0: a whole module, not only weights
    return torch.load(io.BytesIO(data), weights_only=False)


def _rank(
    rank: int,
    ranks: int,
    store: str,
    sent_model: bytes,
    batches: BatchStream,
    schedule: Schedule,
    description: str,
    loss_fn: LossFn,
    position: int | None,
) -> bytes | None:
    """One worker's share of the training; rank 0 returns the weights and the losses."""
    from dammerge.memory import reuse_freed_memory

    model = _deserialised(sent_model)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store, ranks),
        rank=rank,
        world_size=ranks,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        with reuse_freed_memory():
            losses = _train_share(
                rank, ranks, model, batches, schedule, description, loss_fn, position
            )
        # Every rank's DistributedDataParallel is gone before any rank takes the group down:
        # one freed after the group's teardown can wait forever on a peer that has left.
        dist.barrier()
        return _serialised((model.state_dict(), losses)) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _train_share(
    rank: int,
    ranks: int,
    model: torch.nn.Module,
    batches: BatchStream,
    schedule: Schedule,
    description: str,
    loss_fn: LossFn,
    position: int | None,
) -> list[float]:
    """Train ``model`` on this rank's rows of every batch, gradients summed over the ranks."""
    wrapped = DistributedDataParallel(_LossOf(model, loss_fn))

    def rank_loss(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
        part = shard(batch, rank, ranks)
        # DDP averages the gradients over the ranks: weighting each rank's mean by
        # ranks * (its tokens / all tokens) makes that average the whole batch's mean.
        return module(part) * (ranks * predicted_tokens(part) / predicted_tokens(batch))

    return run_steps(
        wrapped,
        batches(),
        schedule,
        description if rank == 0 else None,
        rank_loss,
        position,
        loss_value=_mean_over_ranks,
    )


def _mean_over_ranks(loss: torch.Tensor) -> float:
    """The whole batch's mean loss: the mean of the ranks' weighted losses."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()

"""Learned merging across processes: ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node K -m dammerge merge dam.yaml OUT`` starts K copies of the command.
torchrun tells each its place (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); :func:`start` reads them, reaches the rendezvous and starts the process group
(nccl on CUDA, gloo on CPU), each rank on the device its ``LOCAL_RANK`` names. Outside torchrun
it returns the one-process context, for which every method below is the identity: the engine
runs one code path whatever the world size.

How a step is shared (both strategies, ``training.distributed: replicate | shard``): the step's
sequences (``batch_size`` of every source, in source order) are cut into K contiguous runs, one
per rank, so with K = N sources and batch size 1 rank i trains on source i. A rank's part of a
source's loss is weighted by its share of that source's counted positions, so the sum over
ranks is the one-process loss exactly. After the backward, one all-reduce adds up the
coefficient gradients and the per-source losses (float64; megabytes, never the frozen stores):
every rank then holds the same gradients and losses, checks them for NaN/Inf in the same way
(one rank's divergence stops all with the same error) and takes the same optimizer step, so
the coefficients and the optimizer state stay identical, whole, on every rank. That is what
lets rank 0 alone write checkpoints that resume at any world size.

Errors are collective too: the phases where one rank could fail alone (validation, reading
the checkpoints, precomputing its teachers, reading the training checkpoint) run through
:meth:`Distributed.together` or :meth:`Distributed.from_main`, so every rank raises the same
:class:`~dammerge.errors.DammergeError`; the command line prints it on rank 0 only, and every
rank exits non-zero.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dammerge.data.examples import Batch
from dammerge.errors import ConfigError, DammergeError

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
RENDEZVOUS_TIMEOUT_VARIABLE = "DAMMERGE_RENDEZVOUS_TIMEOUT"
COLLECTIVE_TIMEOUT_VARIABLE = "DAMMERGE_COLLECTIVE_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0  # seconds to reach the rendezvous
# Seconds a rank waits in one collective. Generous: ranks wait at a barrier while others
# precompute their teachers, which takes minutes on large models.
DEFAULT_COLLECTIVE_TIMEOUT = 3600.0
STRATEGIES = ("replicate", "shard")
T = TypeVar("T")


class DistributedError(DammergeError):
    """torch.distributed could not start, or the recipe does not fit the world size."""


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True when torchrun (or an equivalent launcher) set this process's rank variables."""
    env = os.environ if environ is None else environ
    return all(env.get(name, "") != "" for name in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class Portion:
    """One rank's part of one source's batch in a step: the rows it trains on and their
    ``weight``, the fraction of the source's counted positions they hold (1.0 when whole).

    ``host_loss_mask`` is the batch's loss mask kept in host memory when the batch is moved to
    a GPU: counted positions are found there without waiting for the device.
    """

    source: int
    batch: Batch
    weight: float = 1.0
    host_loss_mask: torch.Tensor | None = None

    @property
    def positions_mask(self) -> torch.Tensor:
        """The loss mask to find counted positions in (the host's copy when there is one)."""
        return self.batch.loss_mask if self.host_loss_mask is None else self.host_loss_mask


@dataclass(frozen=True)
class StepSums:
    """A step's per-source losses summed over the ranks, and how many ranks failed it."""

    losses: list[float]
    failed_ranks: int = 0


@dataclass
class Distributed:
    """This process's place among the ranks of a run (one process: rank 0 of 1)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group
    strategy: str | None = None  # replicate | shard once resolved; None for one process
    owns_group: bool = False  # this run started the process group (and ends it)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.enabled and self.strategy == "shard"

    def describe(self) -> list[str]:
        """The --dry-run line of the distribution (none for one process)."""
        if not self.enabled:
            return []
        return [
            f"ranks       {self.world_size} ({self.backend}), strategy {self.strategy}, "
            f"this rank on {self.device}"
        ]

    # -- collectives ----------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def together(self, work: Callable[[], T]) -> T:
        """Run ``work`` on every rank; if it raised a user error on any, every rank raises
        the lowest such rank's error (the same message everywhere)."""
        failure: DammergeError | None = None
        result: Any = None
        try:
            result = work()
        except DammergeError as exc:
            if not self.enabled:
                raise
            failure = exc
        if self.enabled:
            reports: list[Any] = [None] * self.world_size
            dist.all_gather_object(reports, _describe_error(failure))
            first = next((r for r in reports if r is not None), None)
            if first is not None:
                if failure is not None and _describe_error(failure) == first:
                    raise failure
                raise _rebuild_error(first)
        return result

    def from_main(self, work: Callable[[], T]) -> T:
        """``work``'s result on rank 0, handed to every rank (its user error raised on all)."""
        if not self.enabled:
            return work()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload = [("value", work())]
            except DammergeError as exc:
                payload = [("error", _describe_error(exc))]
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise _rebuild_error(value)
        return value

    def gather(self, value: T) -> list[T]:
        """``value`` of every rank, in rank order (on every rank)."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    # -- the step -------------------------------------------------------------------------
    def portions(self, batches: list[Batch]) -> list[Portion]:
        """This rank's part of a step whose batches (one per source) are ``batches``."""
        if not self.enabled:
            return [Portion(i, batch) for i, batch in enumerate(batches)]
        units = [(i, row) for i, batch in enumerate(batches) for row in range(len(batch.indices))]
        first, last = share_bounds(len(units), self.rank, self.world_size)
        rows: dict[int, list[int]] = {}
        for source, row in units[first:last]:
            rows.setdefault(source, []).append(row)
        out = []
        for source, chosen in rows.items():
            whole = batches[source]
            if len(chosen) == len(whole.indices):
                out.append(Portion(source, whole))
                continue
            part = select_rows(whole, chosen)
            counted = int(whole.loss_mask.sum())
            weight = int(part.loss_mask.sum()) / counted if counted else 0.0
            out.append(Portion(source, part, weight))
        return out

    def teacher_calls_per_step(self, n_sources: int, batch_size: int) -> int:
        """The most teacher forwards any rank makes in one step: one for all its sources when
        they have equal numbers of rows there (the trainer batches them), else one each."""
        units = [i for i in range(n_sources) for _ in range(batch_size)]
        most = 0
        for rank in range(self.world_size):
            first, last = share_bounds(len(units), rank, self.world_size)
            rows = [units[first:last].count(source) for source in set(units[first:last])]
            most = max(most, 1 if teachers_run_together(rows) else len(rows))
        return most

    def reduce_step(
        self, params: list[torch.nn.Parameter], losses: list[float], failed: bool = False
    ) -> StepSums:
        """Sum the coefficient gradients and the per-source losses over the ranks, in place
        (gradients) and returned (losses). A parameter no rank produced a gradient for keeps
        ``grad = None``, as in one process (the optimizer then leaves it alone).

        ``failed`` says this rank could not compute its part (it ran out of memory): it still
        joins the reduction, so the others learn of it here instead of waiting for it in the
        next collective until the timeout; the sums count the ranks that failed.
        """
        if not self.enabled:
            return StepSums(losses, int(failed))
        device = params[0].device if params else self.device
        flags = [0.0 if p.grad is None else 1.0 for p in params]
        parts = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
            for p in params
        ]
        extras = torch.tensor([*flags, *losses, float(failed)], dtype=torch.float64, device=device)
        buffer = torch.cat([*parts, extras])
        dist.all_reduce(buffer)
        summed_extras = buffer[-len(extras) :].tolist()
        offset = 0
        for param, flag in zip(params, summed_extras[: len(params)], strict=True):
            size = param.numel()
            if flag > 0:
                summed = buffer[offset : offset + size].view_as(param).to(param.dtype)
                param.grad = summed.clone()
            else:
                param.grad = None
            offset += size
        return StepSums(summed_extras[len(params) : -1], round(summed_extras[-1]))

    def largest(self, value: int) -> int:
        """The largest of every rank's ``value`` (on every rank)."""
        if not self.enabled:
            return value
        box = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box.item())

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """End the process group this run started (nothing otherwise)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None


def teachers_run_together(rows: list[int]) -> bool:
    """Whether sources with these numbers of rows in a step run their teachers in one forward
    (the rows in equal groups, one per source); else one forward each. The trainer decides by
    it, and the ranks of a sharded merge count their lockstep forwards by it."""
    return len(set(rows)) == 1


def share_bounds(units: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[first, last)`` of ``units`` items held by ``rank``: K contiguous, near-equal runs."""
    return rank * units // world_size, (rank + 1) * units // world_size


def select_rows(batch: Batch, rows: list[int]) -> Batch:
    """Rows of a padded batch, re-trimmed to their own longest sequence."""
    index = torch.tensor(rows, dtype=torch.long)
    attention = batch.attention_mask[index]
    length = max(1, int(attention.sum(1).max()))
    return Batch(
        batch.input_ids[index, :length],
        attention[:, :length],
        batch.loss_mask[index, :length],
        [batch.indices[r] for r in rows],
    )


# -- starting ---------------------------------------------------------------------------------
def start(device: str) -> Distributed:
    """The context of this process: the one-process one outside torchrun, else a started
    process group (or the one the caller already started)."""
    from dammerge.devices import resolve_device

    asked = resolve_device(device)
    if not launched_by_torchrun():
        return Distributed(asked)
    rank, world_size, local_rank = (_integer(n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if asked.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise DistributedError(
                f"LOCAL_RANK {local_rank} has no GPU: {visible} visible on this node",
                "start at most one rank per GPU (torchrun --nproc-per-node <= GPUs)",
            )
        here = torch.device("cuda", local_rank)
        torch.cuda.set_device(here)
        backend = "nccl"
    else:
        here = torch.device(asked.type)
        backend = "gloo"
    context = Distributed(here, rank, world_size, local_rank, backend=backend)
    if dist.is_initialized():  # a script that started its own group under torchrun
        context.backend = dist.get_backend()
        return context
    store = _rendezvous(rank, world_size)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=_collective_timeout(),
        device_id=here if here.type == "cuda" else None,
    )
    context.owns_group = True
    return context


def _integer(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise DistributedError(
            f"{name}={text!r} is not a number", "launch with torchrun, which sets it"
        ) from None


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise DistributedError(f"{variable}={text!r} is not a positive number of seconds")
    return value


def _rendezvous(rank: int, world_size: int) -> dist.TCPStore:
    """The store every rank meets at (torchrun's own, or one rank 0 hosts), connected within
    ``DAMMERGE_RENDEZVOUS_TIMEOUT`` seconds; then it waits as long as a collective does."""
    address = os.environ.get("MASTER_ADDR", "")
    port_text = os.environ.get("MASTER_PORT", "")
    if not address or not port_text.isdigit():
        raise DistributedError(
            "MASTER_ADDR and MASTER_PORT must name the rendezvous",
            "launch with torchrun, which sets them",
        )
    port = int(port_text)
    wait = _seconds(RENDEZVOUS_TIMEOUT_VARIABLE, DEFAULT_RENDEZVOUS_TIMEOUT)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts = rank == 0 and not agent_store
    try:
        if not hosts:  # a quiet wait first: the store's own retries log C++ stack traces
            _wait_for_listener(address, port, wait)
        store = dist.TCPStore(
            address,
            port,
            world_size,
            is_master=hosts,
            timeout=timedelta(seconds=wait),
            multi_tenant=hosts,
        )
    except (RuntimeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"cannot reach the torch.distributed rendezvous at {address}:{port} "
            f"(rank {rank} of {world_size}) within {wait:g} s: {reason}",
            "start every rank with the same torchrun command (--nnodes, --master-addr, "
            f"--master-port); {RENDEZVOUS_TIMEOUT_VARIABLE} sets how long to wait",
        ) from None
    store.set_timeout(_collective_timeout())
    return store


def _wait_for_listener(address: str, port: int, seconds: float) -> None:
    """Return once ``address:port`` accepts a connection; ``TimeoutError`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("nothing listens there")
        try:
            with socket.create_connection((address, port), timeout=min(left, 2.0)):
                return
        except OSError:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _collective_timeout() -> timedelta:
    return timedelta(seconds=_seconds(COLLECTIVE_TIMEOUT_VARIABLE, DEFAULT_COLLECTIVE_TIMEOUT))


def resolve_strategy(
    context: Distributed, chosen: str | None, n_sources: int, batch_size: int
) -> list[str]:
    """Settle ``training.distributed`` for this run; returns notes for rank 0 to print.

    Under torchrun the default is ``replicate``. ``shard`` needs every rank to train on at
    least one sequence per step (FSDP runs each forward and backward on all ranks together).
    One process ignores the option (a recipe written for torchrun still runs, and resumes).
    """
    if not context.enabled:
        context.strategy = None
        if chosen is None:
            return []
        return [f"training.distributed: {chosen} has no effect in one process (not under torchrun)"]
    context.strategy = chosen or "replicate"
    sequences = n_sources * batch_size
    notes = []
    if sequences < context.world_size:
        if context.strategy == "shard":
            raise ConfigError(
                f"training.distributed: shard over {context.world_size} ranks needs at least "
                f"{context.world_size} sequences per step, but {n_sources} sources x "
                f"batch_size {batch_size} = {sequences}",
                f"raise training.batch_size to {math.ceil(context.world_size / n_sources)} or "
                f"run on at most {sequences} ranks",
            )
        notes.append(
            f"{context.world_size - sequences} of {context.world_size} ranks have no sequence "
            "to train on in a step (raise training.batch_size to use them)"
        )
    return notes


# -- errors across ranks ----------------------------------------------------------------------
def _describe_error(exc: DammergeError | None) -> tuple[str, str, str, str | None] | None:
    if exc is None:
        return None
    kind = type(exc)
    return (kind.__module__, kind.__qualname__, exc.message, exc.hint)


def _rebuild_error(described: tuple[str, str, str, str | None]) -> DammergeError:
    module, qualname, message, hint = described
    for kind in _error_classes(DammergeError):  # the ranks run one program: it is loaded here too
        if (kind.__module__, kind.__qualname__) == (module, qualname):
            try:
                return kind(message, hint)
            except TypeError:  # a subclass with another signature: the base class says the same
                break
    return DammergeError(message, hint)


def _error_classes(root: type[DammergeError]) -> list[type[DammergeError]]:
    """``root`` and every subclass of it loaded in this process."""
    found = [root]
    for kind in root.__subclasses__():
        found += _error_classes(kind)
    return found

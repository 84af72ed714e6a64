"""The training loop of learned merging: readable, deterministic, resumable.

One step = one batch from *every* source's data (the paper's batch size 1 per source): the
merged model's output on source i's batch is pulled towards teacher i (KL or MSE) or made
confident (entropy); the regularisers are added; gradients are clipped; AdamW updates the
float32 coefficients. By default the sources' batches go through the merge together, in one
forward and one backward (the merged weights are formed once per step, not once per source);
``fuse_sources=False`` runs one forward and backward per source instead, which keeps only one
source's activations alive at a time.

State lives in a work folder: ``checkpoint.pt`` (coefficients, optimizer, RNG, step — the data
position *is* the step, see :class:`~dammerge.learned.data.SourceData`) written atomically every
``checkpoint_every`` steps, on Ctrl-C and at the end, and ``train_log.jsonl`` with every loss
term. A run that stops for any reason resumes from the checkpoint and ends with coefficients
bit-identical to an uninterrupted run. A non-finite loss or gradient stops training *before* the
update, leaving the last good checkpoint in place. Running out of memory (see
:func:`out_of_memory`) stops training the same way, with the step, its example length and the
options that lower memory.

Across processes (torchrun), each rank trains on its portion of the step's sequences and the
gradients and losses are summed over the ranks before any check or update (see
:mod:`dammerge.learned.distributed`); rank 0 alone writes the work folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dammerge.data.examples import Batch
from dammerge.errors import DammergeError, Interrupted
from dammerge.learned import losses
from dammerge.learned.data import SourceData
from dammerge.learned.distributed import Distributed, Portion, teachers_run_together
from dammerge.learned.functional import EAGER, MergedLinearFunction
from dammerge.learned.kernels import compile_give_ups, compile_layers, store_passes
from dammerge.learned.layers import CoefficientScheme
from dammerge.learned.model import MergedModel
from dammerge.learned.settings import TrainingSettings
from dammerge.learned.teachers import (
    LockstepTeacher,
    OnTheFlyTeacher,
    TeacherOutput,
    to_device,
)
from dammerge.memory import reuse_freed_memory
from dammerge.terminal import print_lines

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
Teacher = Callable[[int, Batch], TeacherOutput]


class TrainingDiverged(DammergeError):
    """A loss term or gradient became NaN/Inf; training stopped before the bad update."""


class TrainingOutOfMemory(DammergeError):
    """The device ran out of memory during a step; the last checkpoint is kept."""


CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: CUDA's ``torch.OutOfMemoryError``, Python's
    ``MemoryError``, or the CPU allocator's error (a plain ``RuntimeError`` in torch)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and CPU_ALLOCATOR_FAILURE in str(exc)


def memory_options(settings: TrainingSettings, length: int | None = None) -> list[str]:
    """The options that lower a run's memory and are not switched on yet."""
    options = []
    if not settings.gradient_checkpointing:
        options.append("gradient_checkpointing: true")
    if settings.objective != "entropy" and settings.teacher == "on_the_fly":
        options.append("teacher: precomputed")
    if settings.offload == "none":
        options.append("offload: layers")
    options.append("more ranks with training.distributed: shard")
    below = settings.max_length if length is None else min(length, settings.max_length)
    options.append(f"a max_length below {below}")
    return options


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    last: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    log: Path | None = None


def total_steps(settings: TrainingSettings, data: list[SourceData]) -> int:
    """``steps`` if given, else ``epochs`` (default 1) passes over the largest dataset."""
    if settings.steps is not None:
        return settings.steps
    longest = max(math.ceil(len(d) / settings.batch_size) for d in data)
    return max(1, math.ceil((settings.epochs or 1.0) * longest))


def objective(
    settings: TrainingSettings,
    logits: torch.Tensor,
    teacher: TeacherOutput | None,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The token-level objective of one source's batch."""
    if settings.objective == "entropy":
        return losses.entropy(logits, mask)
    assert teacher is not None
    if teacher.logits is not None:
        if settings.objective == "mse":
            return losses.mse_logits(logits, teacher.logits, mask)
        return losses.kl_divergence(
            logits,
            teacher.logits,
            mask,
            temperature=settings.temperature,
            direction=settings.kl_direction,
        )
    assert teacher.values is not None and teacher.indices is not None
    if settings.objective == "mse":
        return losses.topk_mse_logits(logits, teacher.values, teacher.indices, mask)
    return losses.topk_kl_divergence(
        logits,
        teacher.values,
        teacher.indices,
        mask,
        temperature=settings.temperature,
        direction=settings.kl_direction,
    )


def objective_with_grad(
    settings: TrainingSettings,
    logits: torch.Tensor,
    teacher: TeacherOutput | None,
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """The objective of (positions, vocab) logit rows (all counted), its gradient into ``grad_out``.

    Forward KL (DAM's objective) is differentiated by hand, straight into ``grad_out`` (which
    may be ``logits`` itself); every other objective goes through autograd on a detached leaf.
    Returns the loss, detached.
    """
    forward_kl = settings.objective == "kl" and settings.kl_direction == "forward"
    if forward_kl and teacher is not None:
        index_or_logits = teacher.logits if teacher.logits is not None else teacher.indices
        assert index_or_logits is not None
        return losses.forward_kl_with_grad(
            logits,
            index_or_logits,
            grad_out,
            temperature=settings.temperature,
            values=teacher.values if teacher.logits is None else None,
        )
    leaf = logits.detach().requires_grad_(True)
    loss = objective(settings, leaf, teacher, None)
    loss.backward()
    if leaf.grad is None:
        grad_out.zero_()
    else:
        grad_out.copy_(leaf.grad)
    return loss.detach()


def regularisers(
    settings: TrainingSettings, scheme: CoefficientScheme, params: list[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """The weighted regulariser terms that are switched on (λ > 0), over the coefficient
    tensors ``params`` (the trainer's list: walking the model for them every step costs the
    host more than the terms themselves)."""
    groups = [scheme.activate(p) for p in params]
    terms: dict[str, torch.Tensor] = {}
    if settings.lambda_cos > 0:
        terms["cosine"] = settings.lambda_cos * losses.cosine_similarity_loss(groups)
    if settings.lambda_l1 > 0:
        terms["l1"] = settings.lambda_l1 * losses.l1_loss(groups)
    if settings.lambda_l2 > 0:
        terms["l2"] = settings.lambda_l2 * losses.l2_loss(groups)
    return terms


def _stack_batches(batches: list[Batch], pad_id: int) -> Batch:
    """The sources' batches as one, right-padded to the longest (padding is never counted)."""
    length = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return Batch(
        torch.cat([pad(b.input_ids, pad_id) for b in batches]),
        torch.cat([pad(b.attention_mask, 0) for b in batches]),
        torch.cat([pad(b.loss_mask, 0) for b in batches]),
        [i for b in batches for i in b.indices],
    )


def _stack_masks(masks: list[torch.Tensor], length: int) -> torch.Tensor:
    """The loss masks of the stacked batch (see :func:`_stack_batches`), padded with False."""
    return torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks])


def _flat_positions(
    mask: torch.Tensor, first_row: int, width: int, device: torch.device | None = None
) -> torch.Tensor | slice:
    """Flat (row-major) indices, in the stacked batch, of one source's counted positions.

    A contiguous run (the usual case: every position but the last of one sequence) becomes a
    slice, so selecting it is a view and its gradient a plain copy, not a gather/scatter. The
    indices are found where ``mask`` is (the host, in training) and handed to ``device``.
    """
    batch, length = mask.shape
    rows = torch.arange(first_row, first_row + batch, device=mask.device)[:, None] * width
    index = (rows + torch.arange(length, device=mask.device))[mask]
    if index.numel() and int(index[-1] - index[0]) + 1 == index.numel():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index if device is None else to_device(index, device)


def _take_rows(flat: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return flat[rows] if isinstance(rows, slice) else flat.index_select(0, rows)


def _output_not_saved(logits: torch.Tensor) -> bool:
    """True when ``logits`` is the output of the merged-linear function, which never saves its
    output for backward (a plain ``nn.Linear`` head or a soft-capped one may differ, and
    then the logits must not be overwritten)."""
    backward_cls = getattr(MergedLinearFunction, "_backward_cls", None)
    return backward_cls is not None and isinstance(logits.grad_fn, backward_cls)


def _select_target(target: TeacherOutput | None, mask: torch.Tensor) -> TeacherOutput | None:
    """The teacher's signal at the counted positions only, as (positions, ·) rows."""
    if target is None:
        return None
    signal = target.logits if target.logits is not None else target.values
    assert signal is not None
    rows = _flat_positions(mask, 0, mask.shape[1], signal.device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return _take_rows(t.reshape(-1, t.shape[-1]), rows)

    if target.logits is not None:
        return TeacherOutput(logits=pick(target.logits))
    assert target.values is not None and target.indices is not None
    return TeacherOutput(values=pick(target.values), indices=pick(target.indices))


def enable_gradient_checkpointing(inner: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant), in training mode with every
    dropout off, so the recomputed activations equal the saved ones."""
    kwargs = {"use_reentrant": False}
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x name
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in inner.modules():  # training mode is needed for checkpointing; no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        if hasattr(inner.config, key):
            setattr(inner.config, key, 0.0)
    inner.train()


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives during the block until it ends.

    The optimizer update and the step counter must move together: an interruption between
    them leaves no state that a checkpoint may keep. The block takes milliseconds, so the user
    does not notice the wait. Only the main thread can install signal handlers; elsewhere the
    block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):  # Python's own handler raises KeyboardInterrupt
        previous(received[0], None)
    elif received and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


def _atomic_save(obj: Any, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


class Trainer:
    """Trains the coefficients of a :class:`MergedModel` (see the module docstring)."""

    def __init__(
        self,
        model: MergedModel,
        data: list[SourceData],
        teacher: Teacher | None,
        settings: TrainingSettings,
        work_dir: Path,
        *,
        device: torch.device,
        fingerprint: str = "",
        progress: bool = True,
        names: list[str] | None = None,
        fuse_sources: bool = True,
        ranks: Distributed | None = None,
    ) -> None:
        self.model, self.data, self.teacher = model, data, teacher
        self.ranks = ranks or Distributed(device)
        # Sharded ranks must run the same forwards and backwards: one fused pass each.
        self.fuse_sources = fuse_sources or self.ranks.sharded
        self.settings, self.device = settings, device
        self.work_dir = Path(work_dir)
        self.fingerprint = fingerprint
        self.progress = progress
        self.names = names or [str(i) for i in range(len(data))]
        self.steps = total_steps(settings, data)
        self.params = model.coefficient_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.step_length = 0  # tokens of the longest example in the current step
        self._updating = False
        passes = store_passes(settings.kernels, device)
        model.use_passes(passes)
        # dynamo's silent give-ups so far, watched while compiled code runs (None: it does not)
        self._give_ups = compile_give_ups() if passes is not EAGER else None
        if settings.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        if settings.kernels == "layers" and passes is not EAGER:
            self._compile_layers()

    def _compile_layers(self) -> None:
        """``training.kernels: layers``: every decoder layer compiled whole, where its stores
        are resident (streaming and sharding fetch them inside the layer, which a compiled
        graph cannot hold: those runs keep the compiled passes only, and say so)."""
        if self.model.streamer is not None or self.ranks.sharded:
            why = "offload: layers" if self.model.streamer is not None else "distributed: shard"
            print_lines(
                [
                    f"note: training.kernels: layers does not compile layers under {why}; "
                    "the merge passes are compiled"
                ],
                style="yellow",
            )
            return
        count = compile_layers(self.model.model)
        if count and self.progress:
            print_lines(
                [
                    f"training.kernels: layers: {count} decoder layers are compiled during the "
                    "first step (tens of seconds before it ends)"
                ],
                style="dim",
            )

    def _enable_gradient_checkpointing(self) -> None:
        enable_gradient_checkpointing(self.model.model)

    # -- state ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT

    @property
    def log_path(self) -> Path:
        return self.work_dir / LOG

    def save_checkpoint(self) -> None:
        """Write the state (rank 0 only: every rank holds the same, whole state)."""
        if not self.ranks.is_main:
            self.saved_step = self.step  # the state rank 0 writes
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "coefficients": self.model.coefficient_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        _atomic_save(state, self.checkpoint_path)
        self.saved_step = self.step

    def _interrupted(self) -> Interrupted:
        """What a Ctrl-C kept: the state after the last whole step, or nothing yet."""
        if not self.checkpoint_path.is_file():
            return Interrupted("training stopped before its first checkpoint: nothing was kept")
        saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)["step"]
        return Interrupted(
            f"training stopped; its state after step {saved} is kept in {self.work_dir}",
            "run the same command again to resume from there",
        )

    def load_checkpoint(self) -> int:
        """Restore the saved state (read by rank 0, handed to every rank); returns the step it
        resumes at."""
        state = self.ranks.from_main(self._read_checkpoint)
        self.model.load_coefficient_state(state["coefficients"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.saved_step = self.step
        if self.ranks.is_main:
            self._truncate_log(self.step)
        return self.step

    def _read_checkpoint(self) -> dict[str, Any]:
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DammergeError(
                f"cannot read training checkpoint {self.checkpoint_path}: {exc}",
                "delete the work folder (or set training.resume: false) to start afresh",
            ) from None
        if state.get("fingerprint") != self.fingerprint:
            raise DammergeError(
                f"the training checkpoint in {self.work_dir} belongs to a different recipe or data",
                "set training.resume: false to start afresh, or use the original recipe",
            )
        return state

    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (they will be run again)."""
        if not self.log_path.is_file():
            return
        kept = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.log_path.write_text("".join(f"{line}\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.ranks.is_main:
            return
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- one step -------------------------------------------------------------------------
    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what} is {value}; stopped before the "
            f"update, the last good checkpoint is kept in {self.work_dir}",
            "lower training.lr or check the data; running again resumes from that checkpoint",
        )

    def _out_of_memory(self, failed_ranks: int = 0) -> TrainingOutOfMemory:
        """The one-line stop; ``failed_ranks`` > 0 when the ranks learnt of it together."""
        kept = (
            f"the last checkpoint (step {self.saved_step}) is kept in {self.work_dir}"
            if self.saved_step is not None
            else "no checkpoint was written"
        )
        where = f"{failed_ranks} of {self.ranks.world_size} ranks" if failed_ranks else self.device
        return TrainingOutOfMemory(
            f"out of memory on {where} at step {self.step + 1} (examples of up to "
            f"{self.step_length} tokens); {kept}",
            f"set {', '.join(memory_options(self.settings, self.step_length))}; with "
            "gradient_checkpointing or offload changed, running again resumes from that checkpoint",
        )

    def train_step(self) -> dict[str, float]:
        """Run step ``self.step`` (forward, backward, clip, update, advance); returns the terms."""
        self.optimizer.zero_grad(set_to_none=True)
        portions = self.ranks.portions([source.batch(self.step) for source in self.data])
        portions = [
            Portion(p.source, p.batch.to(self.device), p.weight, p.batch.loss_mask)
            for p in portions
        ]
        self.step_length = max((p.batch.input_ids.shape[1] for p in portions), default=0)
        losses, failed = self._local_losses(portions)
        sums = self.ranks.reduce_step(self.params, losses, failed)
        if sums.failed_ranks:
            self.optimizer.zero_grad(set_to_none=True)
            self.step_length = self.ranks.largest(self.step_length)
            raise self._out_of_memory(sums.failed_ranks)
        terms, total = self._checked(sums.losses)
        reg = regularisers(self.settings, self.model.scheme, self.params)
        if reg:
            reg_total = sum(reg.values())
            for key, term in reg.items():
                terms[key] = float(term.detach())
            value = float(reg_total.detach())
            if not math.isfinite(value):
                raise self._diverged("the regulariser", value)
            reg_total.backward()
            total += value
        max_norm = self.settings.grad_clip or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            raise self._diverged("the gradient norm", norm)
        with ctrl_c_deferred():
            self._updating = True  # from here until the step counter moves, state is mid-update
            self.optimizer.step()
            for param in self.params:  # the optional [0, 1] clamp
                self.model.scheme.project_(param.data)
            self.step += 1
            self._updating = False
        terms["loss"] = total
        terms["grad_norm"] = norm
        if self._give_ups is not None and compile_give_ups() > self._give_ups:
            self._give_ups = None  # said once
            print_lines(
                [
                    "warning: torch.compile reached its recompile limit: some layers or merge "
                    "passes run uncompiled (slower, same numbers); TORCH_LOGS=recompiles says why"
                ],
                style="yellow",
            )
        return terms

    def _local_losses(self, portions: list[Portion]) -> tuple[list[float], bool]:
        """This rank's losses and gradients for the step, and whether it ran out of memory.

        Replicated ranks share no collective before the step's reduction, so a rank that runs
        out of memory reports it there and every rank stops together with one message. One
        process, or sharded ranks (whose forward gathers every layer with the others), raise
        at once instead.
        """
        try:
            if self.fuse_sources:
                return self._fused_losses(portions), False
            return self._per_source_losses(portions), False
        except (RuntimeError, MemoryError) as exc:
            if not (out_of_memory(exc) and self.ranks.enabled and not self.ranks.sharded):
                raise
        self.optimizer.zero_grad(set_to_none=True)  # hand back what can be handed back
        return [0.0] * len(self.data), True

    def _checked(self, losses: list[float]) -> tuple[dict[str, float], float]:
        """The sources' loss terms by log name, and their sum; a NaN or Inf stops training."""
        terms: dict[str, float] = {}
        total = 0.0
        for i, value in enumerate(losses):
            name = f"{self.settings.objective}/{self.names[i]}"
            if not math.isfinite(value):
                raise self._diverged(f"the {name} loss", value)
            terms[name] = value
            total += value
        return terms, total

    def _per_source_losses(self, portions: list[Portion]) -> list[float]:
        """One forward and backward per source (the smallest activation memory); returns
        each source's loss (this rank's part of it)."""
        losses = [0.0] * len(self.data)
        for portion in portions:
            batch = portion.batch
            target = None if self.teacher is None else self.teacher(portion.source, batch)
            logits = self.model(batch.input_ids, batch.attention_mask)
            loss = objective(self.settings, logits, target, batch.loss_mask)
            if portion.weight != 1.0:
                loss = loss * portion.weight
            losses[portion.source] += float(loss.detach())
            loss.backward()
            del logits, loss, target
        return losses

    def _teacher_calls_done(self) -> None:
        """Let a teacher that must keep in step with other ranks catch up before backward."""
        finish = getattr(self.teacher, "finish_step", None)
        if finish is not None:
            finish()

    def _fused_losses(self, portions: list[Portion]) -> list[float]:
        """Every source's batch through the merge in ONE forward and ONE backward.

        The merged weights are the same for every source within a step, so one pass forms
        each merged weight once (forward) and once more (backward) and computes ``G = gᵀx``
        once per layer, instead of once per source: the per-step merge cost stops growing
        as N². Teachers on the fly run together in one more forward (see
        :meth:`_batched_teachers`). Each source's loss and logit gradient are formed on its own
        logit rows only; the model's backward then runs once with the gathered logit
        gradient. Returns each source's loss (this rank's part of it; 0 for a source it has no
        rows of).

        Nothing here waits for the device before the backward is queued: counted positions come
        from the loss masks' host copies, and the losses are read once the backward is queued.
        """
        losses = [0.0] * len(self.data)
        if not portions:  # more ranks than sequences (replicate): nothing to train on
            self._teacher_calls_done()
            return losses
        batches = [p.batch for p in portions]
        stacked = _stack_batches(batches, self.data[0].pad_id)
        logits = self.model(stacked.input_ids, stacked.attention_mask)
        flat = logits.detach().reshape(-1, logits.shape[-1])
        # The logit gradient can overwrite the logits in place (each source's rows once its
        # loss is done) when nothing saved the logits for backward: one (positions × vocab)
        # tensor less, and no fresh one to fault in and zero.
        in_place = _output_not_saved(logits)
        grad = flat if in_place else torch.zeros_like(flat)
        width = stacked.input_ids.shape[1]
        teachers = self._batched_teachers(portions, stacked)
        pending: list[tuple[int, torch.Tensor]] = []
        row = 0
        for portion in portions:
            batch, mask = portion.batch, portion.positions_mask
            rows = _flat_positions(mask, row, width, flat.device)
            count = batch.input_ids.shape[0]
            if teachers is not None:  # this portion's rows and own length of every teacher's
                target = TeacherOutput(
                    logits=teachers.narrow(0, row, count)[:, : batch.input_ids.shape[1]]
                )
            elif self.teacher is not None:
                target = self.teacher(portion.source, batch)
            else:
                target = None
            row += count
            target = _select_target(target, mask)
            merged = _take_rows(flat, rows)
            # Sources own disjoint rows: a contiguous run gets its gradient written straight
            # into the buffer (over its own logits when in place), scattered rows are copied.
            direct = isinstance(rows, slice)
            grad_rows = grad[rows] if direct else torch.empty_like(merged)
            loss = objective_with_grad(self.settings, merged, target, grad_rows)
            if portion.weight != 1.0:  # a part of the source's rows: its share of the mean
                loss = loss * portion.weight
                grad_rows.mul_(portion.weight)
            pending.append((portion.source, loss))
            if not direct:
                grad.index_copy_(0, rows, grad_rows)
            del merged, grad_rows, target
        del teachers
        if in_place:  # padding and uncounted positions get no gradient (only their rows)
            counted = _stack_masks([p.positions_mask for p in portions], width)
            uncounted = to_device((~counted.reshape(-1)).nonzero().squeeze(1), grad.device)
            grad.index_fill_(0, uncounted, 0)
        self._teacher_calls_done()
        logits.backward(grad.view_as(logits))
        for source, loss in pending:
            losses[source] += float(loss)
        return losses

    def _batched_teachers(self, portions: list[Portion], stacked: Batch) -> torch.Tensor | None:
        """Every portion's teacher logits from one forward over the stacked batch, when the
        teacher runs on the fly and the portions hold equal numbers of rows (else None: one
        teacher call per portion). One forward instead of N: the same arithmetic as batched
        matrix products, N times fewer operations for the host to launch, and on sharded ranks
        one gather of each layer's stores instead of one per source."""
        if not isinstance(self.teacher, OnTheFlyTeacher | LockstepTeacher):
            return None
        if not teachers_run_together([p.batch.input_ids.shape[0] for p in portions]):
            return None
        return self.teacher.batched([p.source for p in portions], stacked).logits

    # -- loop -----------------------------------------------------------------------------
    def _train_until(self, end: int, result: TrainResult, bar: Any) -> None:
        """Steps until ``self.step`` reaches ``end``: log, checkpoint and report as they go."""
        while self.step < end:
            terms = self.train_step()
            result.steps, result.last = self.step, terms
            if self.step % self.settings.log_every == 0 or self.step == end:
                self._log({"step": self.step, **terms, "lr": self.settings.lr})
            if self.step % self.settings.checkpoint_every == 0 or self.step == end:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items() if k != "grad_norm"})

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to ``self.steps`` (or stop after ``stop_after`` steps of this call)."""
        if self.ranks.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        start = self.load_checkpoint() if resume else 0
        if not resume:
            if self.ranks.is_main:
                self.log_path.write_text("")
            self.save_checkpoint()  # the initial state is the first "last good" state
        end = self.steps if stop_after is None else min(self.steps, start + stop_after)
        result = TrainResult(steps=start, resumed_from=start, log=self.log_path)
        began = time.perf_counter()
        bar = tqdm(
            total=self.steps,
            initial=start,
            desc="learning coefficients",
            unit="step",
            disable=not self.progress,
        )
        try:
            with reuse_freed_memory():  # each step's logits reuse the last step's pages
                self._train_until(end, result, bar)
        except KeyboardInterrupt:
            if not self._updating:  # a consistent state: save it so a rerun resumes here
                self.save_checkpoint()
            raise self._interrupted() from None
        except (RuntimeError, MemoryError) as exc:
            if not out_of_memory(exc):
                raise
            self.optimizer.zero_grad(set_to_none=True)  # hand back what can be handed back
            raise self._out_of_memory() from None
        finally:
            bar.close()
        result.seconds = time.perf_counter() - began
        return result

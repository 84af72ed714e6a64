"""The memory plan of a learned merge: what each process will hold, known before any compute.

:func:`plan_memory` adds up, per process, what the engine allocates: the weight stores (the N
sources' copies of every linear), the embeddings and norms, the coefficients with their gradient
and AdamW moments, the transient merge workspace of the largest linear, the activations kept for
backward (with and without gradient checkpointing, at the longest example of the data), the
logits and loss buffers; beside them the teacher files on disk and the peak of the teacher
precompute (one source loaded at a time, before training). It compares the peak with the
device's capacity, says whether the run fits, and which options would make it fit.

Every figure follows the engine's code, not a rule of thumb:

- stores: ``n_store × elements × dtype`` (n_store = sources, plus the base when it takes part);
  ``offload: layers`` moves the decoder layers' stores to host memory and keeps two layers on
  the device; ``shard`` over K ranks divides stores and coefficients by K and adds the two
  decoder layers FSDP gathers at a time (the embeddings and the output head are counted whole:
  their group is gathered for the whole step);
- activations: the tensors a Llama-family decoder layer saves for backward under SDPA attention
  with the merged-linear function (which saves its input, never a weight), per token:
  ``8d + 8 + a·(2d + 4·q + 4·f) + 4·heads`` bytes (d hidden, q attention width, f MLP width, a
  the activation dtype's size: the two RMSNorms keep a float32 copy of their input, the fused
  sources' padded batch makes attention repeat the key/value heads), plus the float attention
  mask SDPA makes of the padding mask in every layer (``longest²`` per sequence); with gradient
  checkpointing each layer keeps only its input (``a·d``) and one layer is recomputed at a time;
- the fused step: every source's batch goes through the merge together, so the step holds
  ``N × batch_size × longest`` positions of activations and logits (``replicate`` and ``shard``
  split those positions over the ranks), and as many again for the teachers' logits when
  teachers run on the fly (all of a rank's in one forward), and the logit gradient written over
  the logits when the head is a merged linear.

On a CPU, device and host are the same memory: the plan adds them and compares the sum with
the memory available. ``bench/dam_memory.py`` measures a CPU run against this plan.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from dammerge.checkpoint.architecture import TensorKind
from dammerge.checkpoint.reader import Checkpoint
from dammerge.errors import DammergeError
from dammerge.learned.functional import COLUMN_GRAD_BLOCK
from dammerge.learned.losses import CHUNK_ELEMENTS, FUSED_CHUNK_ELEMENTS
from dammerge.learned.settings import TrainingSettings
from dammerge.learned.teachers import PRECOMPUTE_BATCH

if TYPE_CHECKING:
    from dammerge.learned.distributed import Distributed
    from dammerge.learned.run import LearnedPlan

Strategy = Literal["single", "replicate", "shard"]
GIB = 2**30
ADAM_BYTES = 16  # float32 value, gradient and AdamW's two moments, per coefficient
SHARD_RANKS = (2, 4, 8, 16, 32, 64, 128)  # world sizes the advice tries for ``shard``
SKIP_ENV = "DAMMERGE_MEMORY_CHECK"  # "0" skips the fit check (the plan is still printed)


class MemoryPlanError(DammergeError):
    """The memory plan says the run will not fit (or training ran out of memory)."""


# -- the model's shape ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of one source model (all counts are elements)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layer_elems: tuple[int, ...]  # per decoder layer: its linears' weights and biases
    layer_in_features: int  # Σ input features of every decoder-layer linear
    layer_linears: int  # number of decoder-layer linears
    biased_linears: int
    layer_norm_elems: int  # every decoder layer's norm parameters together
    other_norm_elems: int  # norms outside the layers (the final norm)
    norm_tensors: int
    embedding_elems: int
    embedding_tensors: int
    head_elems: int  # an untied lm_head (0 when tied)
    largest_linear: int  # out × in of the largest merged linear
    total_elems: int  # one source's parameters

    @property
    def layers(self) -> int:
        return len(self.layer_elems)

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """A Llama-family model (Llama, Mistral, Qwen2) from its ``config.json`` values."""
        d = int(config["hidden_size"])
        f = int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or d // heads)
        vocab = int(config["vocab_size"])
        layers = int(config["num_hidden_layers"])
        tied = bool(config.get("tie_word_embeddings", False))
        q, kv = heads * head_dim, kv_heads * head_dim
        weights = d * q + 2 * d * kv + q * d + 3 * d * f
        bias = config.get("attention_bias", config.get("model_type") == "qwen2")
        biases = (q + 2 * kv) if bias else 0
        head = 0 if tied else vocab * d
        per_layer = weights + biases + 2 * d
        return cls(
            hidden=d,
            intermediate=f,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            tied=tied,
            layer_elems=(weights + biases,) * layers,
            layer_in_features=layers * (5 * d + q + f),
            layer_linears=7 * layers,
            biased_linears=3 * layers if bias else 0,
            layer_norm_elems=2 * d * layers,
            other_norm_elems=d,
            norm_tensors=2 * layers + 1,
            embedding_elems=vocab * d,
            embedding_tensors=1,
            head_elems=head,
            largest_linear=max(d * f, head, d * q),
            total_elems=layers * per_layer + vocab * d + head + d,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> ModelShape:
        """Exact tensor counts from a checkpoint's tensor table (dimensions from its config)."""
        config = checkpoint.config
        tied = bool(config.get("tie_word_embeddings", False))
        counts = _TensorCounts()
        for name in checkpoint.names():
            counts.add(checkpoint.info(name), checkpoint.shape(name), tied)
        d = int(config.get("hidden_size") or counts.embedding_width or 1)
        heads = int(config.get("num_attention_heads") or 1)
        head_dim = int(config.get("head_dim") or d // heads)
        return cls(
            hidden=d,
            intermediate=int(config.get("intermediate_size") or 4 * d),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab=int(config.get("vocab_size") or counts.embedding_rows or 1),
            tied=tied,
            layer_elems=tuple(counts.layer_elems[k] for k in sorted(counts.layer_elems)),
            layer_in_features=counts.in_features,
            layer_linears=counts.linears,
            biased_linears=counts.biased,
            layer_norm_elems=counts.layer_norms,
            other_norm_elems=counts.other_norms,
            norm_tensors=counts.norm_tensors,
            embedding_elems=counts.embeddings,
            embedding_tensors=counts.embedding_tensors,
            head_elems=counts.head,
            largest_linear=counts.largest,
            total_elems=counts.total,
        )


@dataclass
class _TensorCounts:
    """Running element counts over a checkpoint's tensors, by what the engine does with them."""

    layer_elems: dict[int, int] = field(default_factory=dict)
    in_features: int = 0
    linears: int = 0
    biased: int = 0
    layer_norms: int = 0
    other_norms: int = 0
    norm_tensors: int = 0
    embeddings: int = 0
    embedding_tensors: int = 0
    embedding_width: int = 0
    embedding_rows: int = 0
    head: int = 0
    largest: int = 0
    total: int = 0

    def add(self, info, shape: tuple[int, ...], tied: bool) -> None:
        numel = math.prod(shape)
        if info.kind == TensorKind.LM_HEAD and tied:
            return  # a tied head is the embedding (the file may still carry a copy)
        self.total += numel
        if info.kind == TensorKind.LINEAR and info.layer is not None:
            self.layer_elems[info.layer] = self.layer_elems.get(info.layer, 0) + numel
            self.in_features += shape[info.input_dim if info.input_dim is not None else -1]
            self.linears += 1
            self.largest = max(self.largest, numel)
        elif info.kind == TensorKind.BIAS and info.layer is not None:
            self.layer_elems[info.layer] = self.layer_elems.get(info.layer, 0) + numel
            self.biased += 1
        elif info.kind == TensorKind.NORM:
            self.norm_tensors += 1
            if info.layer is None:
                self.other_norms += numel
            else:
                self.layer_norms += numel
        elif info.kind == TensorKind.EMBEDDING:
            self.embeddings += numel
            self.embedding_tensors += 1
            self.embedding_rows = max(self.embedding_rows, shape[0])
            self.embedding_width = max(self.embedding_width, shape[-1])
        elif info.kind == TensorKind.LM_HEAD:
            self.head = numel
            self.largest = max(self.largest, numel)


# -- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryItem:
    """One line of the plan: bytes on the compute device and in host memory, per process."""

    name: str
    device: int
    host: int = 0
    note: str = ""


@dataclass
class MemoryPlan:
    """The per-process plan (see the module docstring); ``fits`` is None when no capacity is
    known (the docs' tables give the bytes, the reader the GPU)."""

    items: list[MemoryItem]
    activations: dict[bool, int]  # gradient checkpointing on/off -> bytes
    checkpointing: bool
    device_peak: int
    host_peak: int
    precompute_peak: int
    teacher_disk: int
    device: str
    capacity: int | None
    host_capacity: int | None
    strategy: Strategy
    world_size: int
    description: str
    fits: bool | None = None
    advice: list[str] = field(default_factory=list)

    @property
    def unified(self) -> bool:
        """Device memory is host memory (a CPU run): one budget for both."""
        return self.device.startswith("cpu")

    @property
    def peak(self) -> int:
        """The most the compute device holds at once (with host memory, on a CPU)."""
        training = self.device_peak + (self.host_peak if self.unified else 0)
        return max(training, self.precompute_peak)

    @property
    def place(self) -> str:
        return "host memory" if self.unified else self.device

    def lines(self) -> list[str]:
        """The plan as printed by ``--dry-run`` and at the start of a run."""
        header = f"  {'':<26}{self.place:>12}"
        out = [f"memory plan {self.description}", header + ("" if self.unified else "        host")]
        for item in self.items:
            if self.unified:
                cells = f"{gib(item.device + item.host):>12}"
            else:
                cells = f"{gib(item.device):>12}{gib(item.host) if item.host else '':>12}"
            out.append(f"  {item.name:<26}{cells}  {item.note}")
        pad = "" if self.unified else " " * 12
        if self.precompute_peak:
            out.append(
                f"  {'teacher precompute peak':<26}{gib(self.precompute_peak):>12}{pad}  "
                "one source model and its logits, before training"
            )
        if self.teacher_disk:
            out.append(f"  {'teacher files on disk':<26}{gib(self.teacher_disk):>12}{pad}  disk")
        out.append(self.verdict())
        if self.advice and not self.fits:
            out.append(f"  would fit with: {'; '.join(self.advice)}")
        return out

    def verdict(self) -> str:
        need = f"  peak {gib(self.peak)} per process"
        if not self.unified and self.host_peak:
            need += f" on {self.device}, {gib(self.host_peak)} in host memory"
        where = "in host memory" if self.unified else f"on {self.device}"
        if self.capacity is None:
            return f"{need} (capacity {where} unknown)"
        room = f"{gib(self.capacity)} available {where}"
        if not self.unified and self.host_capacity is not None and self.host_peak:
            room += f", {gib(self.host_capacity)} in host memory"
        return f"{need}; {room}: {'fits' if self.fits else 'does NOT fit'}"

    def require_fits(self) -> None:
        """Raise :class:`MemoryPlanError` (one line + a hint) when the run will not fit."""
        if self.fits is not False or os.environ.get(SKIP_ENV, "1").strip() == "0":
            return
        hint = (
            f"any of these would make it fit: {'; '.join(self.advice)}"
            if self.advice
            else "no option alone makes it fit: combine gradient_checkpointing, "
            "teacher: precomputed, offload: layers and shard over more ranks, "
            "or lower max_length"
        )
        short = self.peak > (self.capacity or 0)
        needed = (
            f"{gib(self.peak)} per process but {self.place} has {gib(self.capacity or 0)}"
            if short
            else f"{gib(self.host_peak)} of host memory but {gib(self.host_capacity or 0)} are"
        )
        raise MemoryPlanError(
            f"the memory plan needs {needed} available: the run would run out of memory",
            f"{hint} (set {SKIP_ENV}=0 to start anyway)",
        )


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class _Inputs:
    """Everything an estimate depends on (advice re-estimates with one field changed)."""

    shape: ModelShape
    settings: TrainingSettings
    n_sources: int
    longest: int
    dtype_bytes: int
    cuda: bool
    strategy: Strategy
    world_size: int
    teacher_tokens: tuple[int, ...]


def plan_memory(
    shape: ModelShape,
    settings: TrainingSettings,
    *,
    n_sources: int,
    longest: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    capacity: int | None = None,
    host_capacity: int | None = None,
    strategy: Strategy = "single",
    world_size: int = 1,
    teacher_tokens: list[int] | tuple[int, ...] = (),
) -> MemoryPlan:
    """The per-process memory plan of a learned merge (see the module docstring).

    Args:
        shape: the source models' shape (:meth:`ModelShape.from_checkpoint` or ``from_config``).
        settings: the training settings (batch size, checkpointing, offload, teacher, ...).
        n_sources: N, the models being merged.
        longest: tokens of the longest example (default ``settings.max_length``).
        dtype: the weights' and activations' dtype.
        device: the compute device (``cuda``, ``cuda:1``, ``cpu``).
        capacity: bytes available on the device per process (None: unknown, no verdict).
        host_capacity: bytes of host memory available (checked when stores are offloaded).
        strategy: ``single`` (one process), ``replicate`` or ``shard`` over ``world_size`` ranks.
        teacher_tokens: tokens per source, for the size of precomputed teacher files.
    """
    device = str(device)
    world_size = 1 if strategy == "single" else max(1, world_size)
    inputs = _Inputs(
        shape=shape,
        settings=settings,
        n_sources=n_sources,
        longest=min(longest or settings.max_length, settings.max_length),
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        cuda=device.startswith("cuda"),
        strategy=strategy,
        world_size=world_size,
        teacher_tokens=tuple(teacher_tokens),
    )
    plan = _estimate(inputs, device)
    plan.capacity, plan.host_capacity = capacity, host_capacity
    if capacity is not None:
        plan.fits = _fits(plan)
        if not plan.fits:
            plan.advice = _advice(inputs, device, capacity, host_capacity)
    return plan


def _fits(plan: MemoryPlan) -> bool:
    assert plan.capacity is not None
    if plan.peak > plan.capacity:
        return False
    if plan.unified or plan.host_capacity is None:
        return True
    return plan.host_peak <= plan.host_capacity


@dataclass(frozen=True)
class _Counts:
    """Derived counts of one estimate."""

    n_store: int  # rows of every weight store (sources, then the base when it takes part)
    n_learned: int  # rows of every coefficient tensor
    base_in_store: bool
    on_the_fly: bool  # teachers computed from the stores during training
    sequences: int  # sequences per process per step
    ranks: int

    @classmethod
    def of(cls, p: _Inputs) -> _Counts:
        s = p.settings
        base_in_store = s.include_base or s.parametrization == "task_vectors"
        sequences = p.n_sources * s.batch_size
        return cls(
            n_store=p.n_sources + int(base_in_store),
            n_learned=p.n_sources + int(s.include_base and s.parametrization == "full"),
            base_in_store=base_in_store,
            on_the_fly=s.objective != "entropy" and s.teacher == "on_the_fly",
            sequences=math.ceil(sequences / p.world_size),
            ranks=p.world_size,
        )

    def per_rank(self, p: _Inputs, n: int) -> int:
        """What one rank holds of ``n`` bytes that ``shard`` divides."""
        return math.ceil(n / self.ranks) if p.strategy == "shard" else n


def _estimate(p: _Inputs, device: str) -> MemoryPlan:
    s, a = p.settings, p.dtype_bytes
    c = _Counts.of(p)
    positions = c.sequences * p.longest
    activations = {
        ckpt: _activations(p.shape, a, positions, c.sequences, p.longest, ckpt)
        for ckpt in (True, False)
    }
    items = [
        _stores(p, c),
        _embeddings(p, c),
        _coefficients(p, c),
        _activation_item(s.gradient_checkpointing, activations),
        _logits(p, c, positions),
        MemoryItem(
            "merge workspace",
            _merge_workspace(p.shape, a, p.cuda),
            0,
            "merging the largest linear (transient)",
        ),
    ]
    precompute = disk = 0
    if s.objective != "entropy" and s.teacher == "precomputed":
        rows = PRECOMPUTE_BATCH * p.longest
        precompute = p.shape.total_elems * a + rows * p.shape.vocab * a + rows * s.top_k * 16
        disk = sum(t * s.top_k * 8 for t in p.teacher_tokens)
    strategy = "one process" if p.strategy == "single" else f"{p.strategy} over {c.ranks} ranks"
    description = (
        f"(per process; {device}, {a * 8}-bit weights, {strategy}, {p.n_sources} sources, "
        f"longest example {p.longest} tokens, batch {s.batch_size} per source)"
    )
    return MemoryPlan(
        items=items,
        activations=activations,
        checkpointing=s.gradient_checkpointing,
        device_peak=sum(item.device for item in items),
        host_peak=sum(item.host for item in items),
        precompute_peak=precompute,
        teacher_disk=disk,
        device=device,
        capacity=None,
        host_capacity=None,
        strategy=p.strategy,
        world_size=c.ranks,
        description=description,
    )


def _stores(p: _Inputs, c: _Counts) -> MemoryItem:
    """The linears' weight stores: on the device, or streamed from host memory."""
    a = p.dtype_bytes
    layer_bytes = sorted((e * c.n_store * a for e in p.shape.layer_elems), reverse=True)
    all_layers = sum(layer_bytes)
    head = p.shape.head_elems * c.n_store * a
    if p.settings.offload == "layers":  # two slots, each the size of the largest layer
        slots = min(2, len(layer_bytes)) * (layer_bytes[0] if layer_bytes else 0)
        pinned = " (pinned)" if p.cuda else ""
        share = f", 1/{c.ranks} each" if p.strategy == "shard" else ""
        note = (
            f"{c.n_store} copies; decoder layers in host memory{pinned}{share}, two on the device"
        )
        return MemoryItem("stores", slots + head, c.per_rank(p, all_layers), note)
    note = f"{c.n_store} copies of every linear"
    gathered = 0
    if p.strategy == "shard":  # FSDP gathers the current layer and prefetches the next
        note += f", 1/{c.ranks} each + two gathered layers"
        gathered = sum(layer_bytes[:2])
    return MemoryItem("stores", c.per_rank(p, all_layers) + gathered + head, 0, note)


def _embeddings(p: _Inputs, c: _Counts) -> MemoryItem:
    """Embeddings and norms: the base's, plus every source's when merged or needed by
    teachers on the fly (the base is a view of a store when it takes part, else its own)."""
    s, shape = p.settings, p.shape
    stacked = c.n_store + (0 if c.base_in_store else 1)
    copies_emb = stacked if (s.merge_embeddings or c.on_the_fly) else 1
    copies_norm = stacked if (s.merge_norms or c.on_the_fly) else 1
    norms = shape.layer_norm_elems + shape.other_norm_elems
    total = (shape.embedding_elems * copies_emb + norms * copies_norm) * p.dtype_bytes
    note = f"{copies_emb} embedding cop{'y' if copies_emb == 1 else 'ies'}"
    if c.on_the_fly:
        note += " (teachers on the fly keep every source's)"
    return MemoryItem("embeddings and norms", total, 0, note)


def _coefficients(p: _Inputs, c: _Counts) -> MemoryItem:
    count = _coefficient_count(p.shape, p.settings, c.n_learned)
    note = f"{count:,} float32 coefficients × {ADAM_BYTES} B (value, gradient, two AdamW moments)"
    return MemoryItem("coefficients + optimizer", c.per_rank(p, count) * ADAM_BYTES, 0, note)


def _activation_item(checkpointing: bool, activations: dict[bool, int]) -> MemoryItem:
    chosen = "with" if checkpointing else "without"
    note = (
        f"{chosen} gradient checkpointing (with: {gib(activations[True])}, "
        f"without: {gib(activations[False])})"
    )
    return MemoryItem("activations", activations[checkpointing], 0, note)


def _logits(p: _Inputs, c: _Counts, positions: int) -> MemoryItem:
    logits, transient = _logit_buffers(p, positions, c.on_the_fly)
    note = f"{c.sequences} sequences × {p.longest} tokens × {p.shape.vocab:,} logits"
    if c.on_the_fly:
        note += ", and every teacher's"
    return MemoryItem("logits and loss buffers", logits + transient, 0, note)


def _coefficient_count(shape: ModelShape, s: TrainingSettings, n_learned: int) -> int:
    """Learned coefficients: one per input column, per tensor or per model."""
    head_linears = 0 if shape.tied else int(shape.head_elems > 0)
    if s.granularity == "model":
        return n_learned
    if s.granularity == "layer":
        tensors = shape.layer_linears + head_linears
        tensors += shape.embedding_tensors if s.merge_embeddings else 0
        tensors += shape.norm_tensors if s.merge_norms else 0
        return n_learned * tensors
    columns = shape.layer_in_features + head_linears * shape.hidden + shape.biased_linears
    if s.merge_embeddings:
        columns += shape.embedding_tensors * shape.hidden
    if s.merge_norms:
        columns += shape.layer_norm_elems + shape.other_norm_elems
    return n_learned * columns


def _merge_workspace(shape: ModelShape, a: int, cuda: bool) -> int:
    """Transient bytes of merging the largest linear (forward and backward).

    The merged weight accumulates in float32 (4 B per element); a weight store in a narrower
    dtype adds a float32 copy of one source and its scaled product while accumulating, and the
    merged weight cast back for the matmul (4 + 4 + a). On a GPU, backward's ``G = gᵀx`` and one
    product with a source are float32 too (8 B); a CPU forms them a block of rows at a time.
    """
    widen = 0 if a == 4 else 8 + a
    forward = shape.largest_linear * (4 + widen)
    if cuda:
        return max(forward, shape.largest_linear * (8 + a))
    return forward + 2 * COLUMN_GRAD_BLOCK * 4


def activation_bytes_per_token(shape: ModelShape, a: int) -> int:
    """Bytes one decoder layer keeps for backward per token (see the module docstring)."""
    d, f = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    return 8 * d + 8 + a * (2 * d + 4 * q + 4 * f) + 4 * shape.heads


def layer_activation_bytes(shape: ModelShape, a: int, sequences: int, longest: int) -> int:
    """Bytes one decoder layer keeps for backward on a padded batch of ``sequences × longest``:
    the per-token tensors and the attention mask, which SDPA turns from boolean into a float
    tensor of its own in every layer (``sequences × longest²`` elements)."""
    tokens = sequences * longest
    return tokens * activation_bytes_per_token(shape, a) + sequences * longest * longest * a


def _activations(
    shape: ModelShape, a: int, positions: int, sequences: int, longest: int, ckpt: bool
) -> int:
    """Saved activations of the fused step, plus backward's working set for one layer."""
    per_layer = layer_activation_bytes(shape, a, sequences, longest)
    outside = positions * (4 * shape.hidden + 4 + a * shape.hidden)  # final norm, head input
    backward = positions * a * (2 * shape.hidden + 3 * shape.intermediate)
    if ckpt:  # each layer keeps its input; one layer at a time is recomputed
        return shape.layers * positions * a * shape.hidden + per_layer + outside + backward
    return shape.layers * per_layer + outside + backward


def _logit_buffers(p: _Inputs, positions: int, on_the_fly: bool) -> tuple[int, int]:
    """(logits kept through the step, the largest transient beside them) in bytes; teachers
    on the fly give every source's logits at once (the rank's sources: its positions; where
    they cannot run together, one at a time, which takes less)."""
    s, shape, a = p.settings, p.shape, p.dtype_bytes
    logits = positions * shape.vocab * a
    head_is_merged = not shape.tied or s.merge_embeddings
    if not head_is_merged:
        logits *= 2  # a plain head's logits are saved: the gradient needs a buffer of its own
    rows = s.batch_size * p.longest  # one source's positions
    if s.objective == "entropy":
        teacher = 0
    elif on_the_fly:
        teacher = positions * shape.vocab * a
    else:
        teacher = rows * s.top_k * 16  # values and indices, read and selected
    # The loss chunks counted at their smallest: on a GPU they grow into at most a quarter of
    # the memory still free (losses.chunk_elements), so they never make a fitting run fail.
    if s.objective == "kl" and s.kl_direction == "forward":
        loss = 4 * FUSED_CHUNK_ELEMENTS * 4
    else:
        loss = rows * shape.vocab * a + 3 * min(CHUNK_ELEMENTS, rows * shape.vocab) * 4
    return logits, teacher + loss


# -- advice ---------------------------------------------------------------------------------
def _advice(p: _Inputs, device: str, capacity: int, host_capacity: int | None) -> list[str]:
    """The options that, each alone, make the run fit (or all of them together)."""

    def fits(q: _Inputs) -> bool:
        plan = _estimate(q, device)
        plan.capacity, plan.host_capacity = capacity, host_capacity
        return _fits(plan)

    def with_settings(**update: object) -> _Inputs:
        return replace(p, settings=p.settings.model_copy(update=update))

    s = p.settings
    toggles: list[tuple[str, dict[str, object]]] = []
    if not s.gradient_checkpointing:
        toggles.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if s.objective != "entropy" and s.teacher == "on_the_fly":
        toggles.append(("teacher: precomputed", {"teacher": "precomputed"}))
    if s.offload == "none":
        toggles.append(("offload: layers", {"offload": "layers"}))
    advice = [label for label, update in toggles if fits(with_settings(**update))]
    ranks = None
    # CPU ranks on one machine share its memory: more of them do not help
    if p.cuda and s.offload == "none":
        ranks = next(
            (
                k
                for k in SHARD_RANKS
                if k > p.world_size and fits(replace(p, strategy="shard", world_size=k))
            ),
            None,
        )
    if ranks is not None:
        advice.append(f"training.distributed: shard over {ranks} ranks")
    length = _longest_that_fits(p, fits)
    if length is not None:
        advice.append(f"max_length: {length}")
    if not advice and toggles:
        together = with_settings(**{k: v for _, u in toggles for k, v in u.items()})
        if fits(together):
            advice.append(" + ".join(label for label, _ in toggles) + " together")
    return advice


def _longest_that_fits(p: _Inputs, fits) -> int | None:
    """The largest example length (a multiple of 64, at least 64) that fits, if one does."""
    low, high = 1, p.longest // 64
    if high < 1 or not fits(replace(p, longest=64)):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(replace(p, longest=middle * 64)):
            low = middle
        else:
            high = middle - 1
    return low * 64 if low * 64 < p.longest else None


# -- a prepared run ------------------------------------------------------------------------
def plan_run(plan: LearnedPlan, ranks: Distributed | None = None) -> MemoryPlan:
    """The memory plan of a prepared learned merge on the device this process runs on.

    ``ranks`` gives the strategy and world size under torchrun (one process when None). On a
    CPU the processes of one machine share its memory: each gets its share of it.
    """
    strategy: Strategy = "single"
    world_size = 1
    if ranks is not None and ranks.enabled:
        strategy = "shard" if ranks.sharded else "replicate"
        world_size = ranks.world_size
    capacity = device_available(plan.device)
    if capacity is not None and plan.device.type == "cpu":
        capacity //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    longest = max((len(e.input_ids) for d in plan.data for e in d.examples), default=1)
    return plan_memory(
        ModelShape.from_checkpoint(plan.base),
        plan.settings,
        n_sources=len(plan.sources),
        longest=longest,
        dtype=plan.dtype,
        device=str(plan.device),
        capacity=capacity,
        host_capacity=host_available(),
        strategy=strategy,
        world_size=world_size,
        teacher_tokens=[d.token_count() for d in plan.data],
    )


# -- the running machine --------------------------------------------------------------------
def host_available() -> int | None:
    """Bytes of host memory available for new allocations (``MemAvailable``), if known."""
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: free device memory; CPU: available host memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return host_available()
    return None

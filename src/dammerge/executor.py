"""The streaming executor: one output tensor at a time, bounded memory, atomic output.

For each tensor of the plan it reads that tensor from every input (``pread``, one thread per
input), runs the method's kernel on the chosen device, and hands the result to the writer. The
plan fixes every output tensor's name, shape and dtype, hence the output files' headers, so the
writer writes each result at its place in its shard on a background thread while the next
tensors are read and merged. Peak memory is therefore about the inputs of the largest tensor
plus the results still waiting for the disk (at most one shard's worth), whatever the model size.

On a GPU the kernels take almost no time and the CPU would sit idle while they run, so the
inputs of the next tensor are read while the current one is merged (``read_ahead=1``): reading
is then the critical path, at the cost of holding one more tensor's inputs. On a CPU the kernels
are the critical path and reading ahead would only add memory, so it is off.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from dammerge.checkpoint.card import CardFacts, card_text
from dammerge.checkpoint.reader import Checkpoint
from dammerge.checkpoint.writer import CheckpointWriter, TensorSpec, check_output_location
from dammerge.config import DEFAULT_SHARD_SIZE, MergeConfig, RunOptions
from dammerge.devices import resolve_device
from dammerge.errors import ConfigError, DammergeError
from dammerge.methods import MergeInputs
from dammerge.plan import MergePlan, TensorPlan, build_plan, describe
from dammerge.terminal import console, print_lines
from dammerge.vocabulary.output import write_tokenizer


def merge_data_free(config: MergeConfig, out: Path, options: RunOptions) -> Path | None:
    """Plan and execute a data-free recipe; with ``dry_run``, print the plan and write nothing.

    Returns the output folder (None for a dry run). Every problem with the inputs is found by
    :func:`build_plan` before a byte is written; on error nothing is left at ``out``.
    """
    plan = build_plan(config, allow_pickle=options.allow_pickle)
    if options.dry_run:
        if options.progress:
            print_lines(describe(plan))
            console.print("dry run: nothing written", style="green")
        return None
    out = execute(
        plan,
        Path(out),
        device=resolve_device(options.device),
        shard_size=options.shard_size,
        seed=options.seed,
        overwrite=options.overwrite,
        progress=options.progress,
    )
    if options.progress:
        console.print(f"merged model written to {out}", style="green")
    return out


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: stochastic methods give the same result whatever the tensor order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def tensor_sources(plan: MergePlan, tensor: TensorPlan) -> list[tuple[Checkpoint, str]]:
    """The (checkpoint, tensor name) pairs one output tensor is read from: the participants',
    then the base's (one source only, for a tensor copied unchanged). The checkpoints are
    looked up in the plan's inputs, so a caller that swaps those (the search's in-memory
    copies) is read from."""
    by_path = {ck.path: ck for ck in plan.inputs}
    wanted = [*tensor.sources, *([tensor.base_source] if tensor.base_source else [])]
    return [(by_path[source.model], source.tensor) for source in wanted]


def merge_tensor(
    plan: MergePlan,
    tensor: TensorPlan,
    device: torch.device,
    seed: int,
    loaded: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Compute one output tensor of the plan. ``loaded`` holds its inputs already read from
    :func:`tensor_sources` (in that order); without it they are read here. Its entries are
    replaced by their device copies one at a time, so each raw input is freed as soon as it is
    converted (raw bf16 inputs and their float32 copies are never all alive at once), and it is
    emptied on return, so the inputs are freed before the result is written."""
    if loaded is None:
        loaded = [ck.get(name) for ck, name in tensor_sources(plan, tensor)]
    if tensor.copy_from_reference:
        return loaded[0]
    for k, raw in enumerate(loaded):
        loaded[k] = to_device(raw, device, plan.compute_dtype, plan.input_dtype)
        del raw
    if tensor.rows is not None:  # embeddings and lm_head: each input in the output vocabulary
        loaded[:] = tensor.rows.apply(loaded)
    generator = None
    if plan.method.stochastic:
        generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, tensor.name))
    n = len(tensor.sources)
    inputs = MergeInputs(
        name=tensor.name,
        tensors=loaded[:n],
        base=loaded[n] if tensor.base_source is not None else None,
        model_params=tensor.model_params,
        params=tensor.params,
        generator=generator,
    )
    try:
        merged = plan.method.run(inputs)
    except ValueError as exc:
        raise ConfigError(f"{plan.method.name} failed on {tensor.name}: {exc}") from None
    if not torch.isfinite(merged).all():
        raise DammergeError(
            f"the merge produced NaN/Inf in {tensor.name}{_nonfinite_source(plan, tensor, inputs)}",
            "check the input checkpoints and the recipe's weights",
        )
    loaded.clear()
    return merged


def to_device(
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    rounded_to: torch.dtype | None = None,
) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype``, first rounded to ``rounded_to`` when given (the
    recipe's ``dtype``: a float32 checkpoint merged with ``dtype: bfloat16`` is read as
    mergekit reads it, then computed in float32).

    Move first, convert on arrival: a GPU converts for free, while a conversion inside a
    host-to-GPU copy runs on the CPU and sends twice the bytes (bf16 inputs, float32 compute)."""
    moved = tensor.to(device, non_blocking=tensor.is_pinned())
    if rounded_to is not None:
        moved = moved.to(rounded_to)
    return moved.to(dtype)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a GPU result, through page-locked memory (a DMA copy at bus speed).

    The copy is complete when this returns: the writer thread reads the bytes at once."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor)


def _nonfinite_source(plan: MergePlan, tensor: TensorPlan, inputs: MergeInputs) -> str:
    values = [*inputs.tensors, *([inputs.base] if inputs.base is not None else [])]
    for (ck, name), value in zip(tensor_sources(plan, tensor), values, strict=True):
        if not torch.isfinite(value).all():
            return f" (input {ck.path} already holds NaN/Inf in {name})"
    return ""


def read_inputs(
    plan: MergePlan, pool: ThreadPoolExecutor, read_ahead: int, pinned: bool = False
) -> Iterator[tuple[TensorPlan, list[torch.Tensor]]]:
    """Each tensor of the plan with its inputs, read by ``pool`` (``pread`` releases the GIL,
    so the inputs of one tensor are read in parallel), ``read_ahead`` tensors in advance;
    into page-locked memory when ``pinned`` (for a GPU)."""
    queued: deque[tuple[TensorPlan, list[Future[torch.Tensor]]]] = deque()
    remaining = iter(plan.tensors)

    def queue_next() -> None:
        tensor = next(remaining, None)
        if tensor is not None:
            reads = [
                pool.submit(ck.get, name, pinned=pinned)
                for ck, name in tensor_sources(plan, tensor)
            ]
            queued.append((tensor, reads))

    for _ in range(read_ahead + 1):
        queue_next()
    while queued:
        tensor, reads = queued.popleft()
        with record_function("dammerge::wait_for_inputs"):
            loaded = [read.result() for read in reads]
        del reads  # the futures would keep the raw inputs alive while they are merged
        yield tensor, loaded  # the next `read_ahead` tensors are read meanwhile
        del loaded
        queue_next()


def execute(
    plan: MergePlan,
    out: Path,
    *,
    device: torch.device = torch.device("cpu"),
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    read_ahead: int | None = None,
) -> Path:
    """Merge ``plan`` into ``out``; ``read_ahead`` defaults to 1 on a GPU, 0 on a CPU."""
    if read_ahead is None:
        read_ahead = 0 if device.type == "cpu" else 1
    folders = [folder for ck in plan.inputs for folder in ck.source_folders()]
    out = check_output_location(out, folders, overwrite=overwrite)
    workers = (read_ahead + 1) * (len(plan.participants) + 1)
    layout = output_layout(plan)
    with (
        CheckpointWriter(out, shard_size=shard_size, overwrite=overwrite, layout=layout) as writer,
        ThreadPoolExecutor(workers, thread_name_prefix="dammerge-read") as pool,
    ):
        bar = tqdm(
            read_inputs(plan, pool, read_ahead, pinned=device.type == "cuda"),
            total=len(plan.tensors),
            desc=f"{plan.method.name} merge",
            unit="tensor",
            disable=not progress,
        )
        for tensor, loaded in bar:
            with record_function("dammerge::merge"):
                merged = merge_tensor(plan, tensor, device, seed, loaded)
            with record_function("dammerge::to_host"):
                result = to_host(merged.to(plan.output_dtype(tensor)))
            del merged
            with record_function("dammerge::queue_write"):
                writer.add(tensor.name, result)
            del result
        write_side_files(writer, plan, seed)
        with record_function("dammerge::finish_writes"):
            return writer.commit()


def output_layout(plan: MergePlan) -> list[TensorSpec]:
    """Every output tensor's name, shape and written dtype, in the order they are merged."""
    return [TensorSpec(t.name, tuple(t.shape), plan.output_dtype(t)) for t in plan.tensors]


def write_side_files(writer: CheckpointWriter, plan: MergePlan, seed: int) -> None:
    """config.json (dtype and vocabulary size updated), generation config, tokenizer (with
    the merged vocabulary and chat template), recipe and model card."""
    dtypes = {plan.output_dtype(t) for t in plan.tensors if t.dtype.is_floating_point}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    writer.write_config(plan.output_config(), out_dtype)
    generation = plan.reference.folder / "generation_config.json"
    if generation.is_file():
        writer.copy_file(generation)
    write_tokenizer(writer, plan.tokenizer_folder(), plan.vocabulary, plan.chat_template)
    recipe = plan.config.to_yaml(writer.out)
    writer.write_text("dammerge_config.yml", recipe)
    writer.write_text("README.md", model_card(plan, recipe, seed))


def model_card(plan: MergePlan, recipe: str, seed: int) -> str:
    """The model card of a data-free merge (metadata by ``huggingface_hub``)."""
    return card_text(
        CardFacts(
            method=plan.method.name,
            description=plan.method.summary,
            base=plan.base.path if plan.base else None,
            sources=[ck.path for ck in plan.participants],
            recipe=recipe,
            seed=seed,
        )
    )

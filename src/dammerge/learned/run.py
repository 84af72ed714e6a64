"""``dammerge merge`` for learned methods: validate everything, train, export.

Every check that can fail on user input runs before the first forward pass: the training
options, each model's dataset block, the checkpoints (same architecture, tensor names and
shapes as the base), the tokenizers (identical vocabularies), the output location, the device,
and the datasets themselves (readable, fields present, not empty, targets left after
truncation). ``dry_run`` stops there and prints the plan.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.checkpoint.reader import Checkpoint
from dammerge.checkpoint.writer import check_output_location
from dammerge.config import MergeConfig, ModelReference, RunOptions, parse_dtype
from dammerge.data.examples import encode_dataset, pad_id
from dammerge.data.records import opened_records, select_records
from dammerge.data.spec import DatasetSpec, require_dataset
from dammerge.data.tokenizer import load_tokenizer
from dammerge.devices import resolve_device
from dammerge.errors import CheckpointError, ConfigError
from dammerge.learned import distributed
from dammerge.learned.data import SourceData
from dammerge.learned.distributed import Distributed
from dammerge.learned.offload import check_offloadable
from dammerge.learned.settings import TrainingSettings
from dammerge.terminal import console, print_lines
from dammerge.vocabulary.chat import chat_template_text

BOOKKEEPING = {
    "resume",
    "keep_work",
    "checkpoint_every",
    "log_every",
    "work_dir",
    "steps",
    "epochs",
    "distributed",  # a run resumes under any strategy and world size
    # How memory is spent, not what is computed (the coefficients are the same either way):
    # a run stopped for lack of memory resumes with either switched on.
    "gradient_checkpointing",
    "offload",
}


@dataclass
class LearnedPlan:
    """Everything validated and prepared; training needs nothing else."""

    cfg: MergeConfig
    settings: TrainingSettings
    base: Checkpoint
    sources: list[Checkpoint]
    datasets: list[DatasetSpec]
    data: list[SourceData]
    tokenizer: Any
    output: Path
    work_dir: Path
    device: torch.device
    dtype: torch.dtype
    seed: int
    steps: int
    fingerprint: str = ""
    names: list[str] = field(default_factory=list)
    chat_template: str | None = None  # written into the output's tokenizer


# -- validation -----------------------------------------------------------------------------
def _check_recipe(cfg: MergeConfig, settings: TrainingSettings) -> list[DatasetSpec]:
    if cfg.tokenizer is not None or cfg.tokenizer_source == "union":
        raise ConfigError(
            f"{cfg.merge_method} trains in the base's vocabulary; the 'tokenizer' block and "
            "tokenizer_source: union are for data-free methods",
            "remove them: the output gets the base's tokenizer (or tokenizer_source's)",
        )
    if cfg.parameters or any(m.parameters for m in cfg.models):
        raise ConfigError(
            f"{cfg.merge_method} learns its coefficients; 'parameters' are for data-free methods",
            "remove 'parameters'; set a starting point with training.init instead",
        )
    if not cfg.base_model:
        raise ConfigError(
            f"{cfg.merge_method} needs a base_model",
            "set base_model: the model the sources were fine-tuned from (embeddings, norms "
            "and architecture come from it)",
        )
    if len(cfg.models) < 2:
        raise ConfigError(f"{cfg.merge_method} merges at least 2 models, got {len(cfg.models)}")
    _refuse_lora_references(cfg)
    datasets = [require_dataset(m.model, m.dataset, "learned merging") for m in cfg.models]
    _check_init(settings, len(cfg.models))
    return datasets


def _refuse_lora_references(cfg: MergeConfig) -> None:
    """Learned merges read their models whole (teachers, the trained model) rather than
    through the data-free planner's tensor-by-tensor reader that folds LoRA adapters in."""
    for reference in [cfg.base_model or "", *(m.model for m in cfg.models)]:
        if ModelReference.parse(reference).lora is not None:
            raise ConfigError(
                f"{cfg.merge_method} does not take LoRA references (model+adapter): {reference}",
                "write the folded model first (merge_method: passthrough with that one "
                "reference) and list its folder",
            )


def check_architecture(base: Checkpoint, sources: list[Checkpoint]) -> None:
    """Same model type, tensor names and shapes as the base (all problems at once)."""
    from dammerge.plan import check_compatible  # the data-free planner's shared check

    base_type = base.config.get("model_type")
    for ck in sources:
        other = ck.config.get("model_type")
        if other != base_type:
            raise CheckpointError(
                f"model {ck.path} is a {other} model but the base is {base_type}",
                "learned merging needs models fine-tuned from the base (same architecture)",
            )
    check_compatible(base, sources)


def check_tokenizers(tokenizer: Any, reference: Path, sources: list[Checkpoint]) -> None:
    """Every source must share the tokenizer (vocabulary and special tokens) of the base."""
    vocab = tokenizer.get_vocab()
    specials = _special_ids(tokenizer)
    ref_file = reference / "tokenizer.json"
    for ck in sources:
        own_file = ck.path / "tokenizer.json"
        if ref_file.is_file() and own_file.is_file() and _same_bytes(ref_file, own_file):
            continue
        if not any((ck.path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            continue  # no tokenizer of its own: it uses the base's
        other = load_tokenizer(ck.path)
        other_vocab = other.get_vocab()
        if other_vocab != vocab:
            differing = sorted(set(vocab.items()) ^ set(other_vocab.items()))[:1]
            detail = f"vocab sizes {len(vocab)} vs {len(other_vocab)}"
            if len(vocab) == len(other_vocab) and differing:
                detail = f"token {differing[0][0]!r} has different ids"
            raise CheckpointError(
                f"the tokenizer of {ck.path} differs from the base's ({detail})",
                "learned merging needs one tokenizer: merge models that share the base's",
            )
        if _special_ids(other) != specials:
            raise CheckpointError(
                f"the tokenizer of {ck.path} has different special tokens than the base's "
                f"({_special_ids(other)} vs {specials})",
                "learned merging needs one tokenizer: merge models that share the base's",
            )


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _weights_dtype(
    settings: TrainingSettings, recipe_dtype: str | None, base: Checkpoint
) -> torch.dtype:
    """``training.dtype``, else the recipe's top-level ``dtype`` (as in a mergekit recipe), else
    the dtype of the base's linear weights."""
    explicit = parse_dtype(settings.dtype) or parse_dtype(recipe_dtype)
    if explicit is not None:
        return explicit
    for name in base.names():
        info = base.info(name)
        if info.kind.value == "linear" and base.dtype(name).is_floating_point:
            return base.dtype(name)
    return torch.float32


def prepare_data(
    plan_sources: list[Checkpoint],
    datasets: list[DatasetSpec],
    settings: TrainingSettings,
    tokenizer: Any,
    seed: int,
) -> list[SourceData]:
    out = []
    for i, (ck, spec) in enumerate(zip(plan_sources, datasets, strict=True)):
        where = f"model {ck.name}"
        with opened_records(spec, where=where) as records:
            examples = encode_dataset(
                select_records(records, spec, seed, where),
                spec,
                tokenizer,
                loss_on=settings.loss_on,
                max_length=settings.max_length,
                where=where,
            )
        data = SourceData(
            examples,
            seed=seed,
            source=i,
            batch_size=settings.batch_size,
            pad_id=pad_id(tokenizer),
        )
        out.append(data)
    return out


def _fingerprint(plan: LearnedPlan) -> str:
    payload = {
        "method": plan.cfg.merge_method,
        "settings": plan.settings.model_dump(exclude=BOOKKEEPING),
        "base": str(plan.base.path),
        "sources": [str(ck.path) for ck in plan.sources],
        "data": [d.fingerprint() for d in plan.data],
        "seed": plan.seed,
        "dtype": str(plan.dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare(
    cfg: MergeConfig,
    settings: TrainingSettings,
    output: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
) -> LearnedPlan:
    """Validate the recipe and its inputs and load the data (no model weights yet)."""
    from dammerge.learned.train import total_steps

    datasets = _check_recipe(cfg, settings)
    base = Checkpoint(cfg.base_model)  # type: ignore[arg-type]
    sources = [Checkpoint(m.model) for m in cfg.models]
    check_architecture(base, sources)
    if settings.offload == "layers":
        check_offloadable(base)
    tokenizer_folder = (
        base.path if cfg.tokenizer_source in (None, "base") else Path(cfg.tokenizer_source)
    )
    tokenizer = load_tokenizer(tokenizer_folder)
    check_tokenizers(tokenizer, tokenizer_folder, sources)
    vocab = int(base.config.get("vocab_size") or len(tokenizer))
    if settings.teacher == "precomputed" and settings.top_k > vocab:
        raise ConfigError(f"training.top_k={settings.top_k} exceeds the vocabulary ({vocab})")
    inputs = [base.path, *(ck.path for ck in sources)]
    output = check_output_location(Path(output), inputs, overwrite=overwrite)
    work_dir = Path(settings.work_dir or output.parent / f"{output.name}.dammerge-work").resolve()
    for src in inputs:
        if work_dir.is_relative_to(src) or src.is_relative_to(work_dir):
            raise ConfigError(f"work folder {work_dir} overlaps input {src}")
    torch_device = resolve_device(device)
    data = prepare_data(sources, datasets, settings, tokenizer, seed)
    plan = LearnedPlan(
        cfg=cfg,
        settings=settings,
        base=base,
        sources=sources,
        datasets=datasets,
        data=data,
        tokenizer=tokenizer,
        output=output,
        work_dir=work_dir,
        device=torch_device,
        dtype=_weights_dtype(settings, cfg.dtype, base),
        seed=seed,
        steps=total_steps(settings, data),
        names=_unique_names(sources),
        chat_template=None
        if cfg.chat_template is None
        else chat_template_text(cfg.chat_template, [base.path, *(ck.path for ck in sources)]),
    )
    plan.fingerprint = _fingerprint(plan)
    return plan


def _unique_names(sources: list[Checkpoint]) -> list[str]:
    names = [ck.name for ck in sources]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def describe(plan: LearnedPlan) -> list[str]:
    """Lines for --dry-run."""
    s = plan.settings
    lines = [
        f"method      {plan.cfg.merge_method}: learned merge ({s.parametrization} weights, "
        f"{s.granularity} coefficients, activation {s.activation}, init {s.init})",
        f"base        {plan.base.path}",
    ]
    for ck, spec, data in zip(plan.sources, plan.datasets, plan.data, strict=True):
        lines.append(
            f"model       {ck.path}  <- {spec.path} ({spec.template}, {len(data)} examples, "
            f"{data.token_count()} tokens)"
        )
    regs = f"cos {s.lambda_cos:g}, l1 {s.lambda_l1:g}, l2 {s.lambda_l2:g}"
    teacher = "none" if s.objective == "entropy" else s.teacher
    lines += [
        f"objective   {s.objective} (T={s.temperature:g}, {s.kl_direction}); {regs}; "
        f"loss on {s.loss_on} tokens; teacher {teacher}",
        f"training    {plan.steps} steps, batch {s.batch_size} per source, AdamW lr {s.lr:g}, "
        f"grad clip {s.grad_clip}",
        f"merged      embeddings {s.merge_embeddings}, norms {s.merge_norms}, "
        f"base as participant {s.include_base}",
        f"weights     {str(plan.dtype).removeprefix('torch.')} on {plan.device} "
        "(coefficients float32)"
        + (", decoder layers streamed from host memory" if s.offload == "layers" else ""),
        f"work folder {plan.work_dir}",
        f"output      {plan.output}",
    ]
    return lines


# -- the whole path -------------------------------------------------------------------------
def _resume_flag(plan: LearnedPlan) -> bool:
    from dammerge.learned.train import CHECKPOINT

    exists = (plan.work_dir / CHECKPOINT).is_file()
    if plan.settings.resume is True and not exists:
        raise ConfigError(
            f"training.resume is true but {plan.work_dir} holds no checkpoint",
            "use resume: auto (the default) to start afresh when there is none",
        )
    return exists and plan.settings.resume in (True, "auto")


def train_plan(
    plan: LearnedPlan,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    ranks: Distributed | None = None,
) -> tuple[Any, Any]:
    """Build the merge module and teachers, train; returns (model, TrainResult).

    ``ranks`` places this process among the ranks of a torchrun launch (one process when
    None): see :mod:`dammerge.learned.distributed`.
    """
    from dammerge.learned.teachers import (
        LockstepTeacher,
        OnTheFlyTeacher,
        PrecomputedTeacher,
        precompute_teacher_files,
    )
    from dammerge.learned.train import Trainer

    ranks = ranks or Distributed(plan.device)
    s = plan.settings
    needs_teacher = s.objective != "entropy"
    teacher = None
    if needs_teacher and s.teacher == "precomputed":
        files = ranks.together(
            lambda: precompute_teacher_files(
                plan.sources,
                plan.data,
                s.top_k,
                plan.work_dir / "teachers",
                device=plan.device,
                dtype=plan.dtype,
                progress=progress,
                rank=ranks.rank,
                world_size=ranks.world_size,
            )
        )
        teacher = PrecomputedTeacher(files, plan.device)
    keep_teacher_weights = needs_teacher and s.teacher == "on_the_fly"
    model = ranks.together(lambda: _build_model(plan, keep_teacher_weights, ranks))
    if needs_teacher and teacher is None:
        teacher = OnTheFlyTeacher(model)
        if ranks.sharded:
            calls = ranks.teacher_calls_per_step(len(plan.data), s.batch_size)
            teacher = LockstepTeacher(teacher, calls)
    trainer = Trainer(
        model,
        plan.data,
        teacher,
        s,
        plan.work_dir,
        device=plan.device,
        fingerprint=plan.fingerprint,
        progress=progress,
        names=plan.names,
        ranks=ranks,
    )
    resume = ranks.from_main(lambda: _resume_flag(plan))
    if resume and progress:
        console.print(f"resuming from {plan.work_dir}", style="yellow")
    result = trainer.run(resume=resume, stop_after=stop_after)
    return model, result


def _build_model(plan: LearnedPlan, keep_teacher_weights: bool, ranks: Distributed) -> Any:
    """The merge module: whole on this rank, or this rank's shard of it."""
    from dammerge.learned.model import MergeOptions, build_merged_model

    options = MergeOptions.from_settings(plan.settings)
    if ranks.sharded:
        from dammerge.learned.sharded import build_sharded_model

        return build_sharded_model(
            plan.base,
            plan.sources,
            options,
            ranks=ranks,
            dtype=plan.dtype,
            keep_teacher_weights=keep_teacher_weights,
            seed=plan.seed,
            offload=plan.settings.offload == "layers",
        )
    return build_merged_model(
        plan.base,
        plan.sources,
        options,
        device=plan.device,
        dtype=plan.dtype,
        keep_teacher_weights=keep_teacher_weights,
        seed=plan.seed,
        offload=plan.settings.offload,
    )


def _check_init(s: TrainingSettings, n_sources: int) -> None:
    from dammerge.learned.layers import CoefficientScheme, init_error

    scheme = CoefficientScheme(n_sources, s.parametrization, s.activation, s.include_base)
    problem = init_error(scheme, s.init)
    if problem:
        raise ConfigError(f"training.init: {problem}")


def compute_stats(
    plan: LearnedPlan,
    model: Any,
    result: Any,
    ranks: Distributed | None = None,
    held: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Compute counts of a finished training, in passes over one sequence.

    Every step runs ``batch_size`` sequences of every source through the merged model, forward
    and backward. Teachers on the fly add one teacher forward per trained sequence; precomputed
    teachers ran once over each source's examples; the entropy objective has no teacher.
    Under torchrun the counts are of all ranks together, and ``distributed`` says how the
    ranks shared the work and what each held of the weight stores (``held``, per rank).
    """
    s = plan.settings
    trained = result.steps * s.batch_size * len(plan.sources)
    if s.objective == "entropy":
        teacher_forwards = 0
    elif s.teacher == "precomputed":
        teacher_forwards = sum(len(d) for d in plan.data)
    else:
        teacher_forwards = trained
    stats: dict[str, Any] = {
        "steps": result.steps,
        "training_seconds": round(result.seconds, 3),
        "merged_forward_sequences": trained,
        "teacher_forward_sequences": teacher_forwards,
        "forward_passes": trained + teacher_forwards,
        "backward_passes": trained,
        "fitness_evaluations": 0,
        "trainable_coefficients": sum(p.numel() for p in model.coefficient_parameters()),
    }
    if ranks is not None and ranks.enabled:
        stats["distributed"] = {
            "strategy": ranks.strategy,
            "world_size": ranks.world_size,
            "backend": ranks.backend,
            "ranks": held or [],
        }
    return stats


def run_learned_merge(
    cfg: MergeConfig,
    settings: TrainingSettings,
    output: Path,
    options: RunOptions,
    *,
    stop_after: int | None = None,
) -> Path | None:
    """Validate, train and export a learned merge; returns the output folder.

    Returns None for ``dry_run`` and when ``stop_after`` steps ended the run early (the
    training state stays in the work folder; calling again resumes). Under torchrun every
    rank trains and rank 0 alone writes (the other ranks return None).
    """
    ranks = distributed.start(options.device)
    try:
        return _run_learned_merge(ranks, cfg, settings, Path(output), options, stop_after)
    finally:
        ranks.close()


def memory_plan(plan: LearnedPlan, ranks: Distributed) -> Any:
    """The memory plan of this rank (see :mod:`dammerge.learned.memory_plan`), once the
    strategy is settled."""
    from dammerge.learned.memory_plan import plan_run

    return plan_run(plan, ranks)


def _run_learned_merge(
    ranks: Distributed,
    cfg: MergeConfig,
    settings: TrainingSettings,
    output: Path,
    options: RunOptions,
    stop_after: int | None,
) -> Path | None:
    from dammerge.learned.export import export_merged
    from dammerge.learned.sharded import held_store_bytes

    plan = ranks.together(
        lambda: prepare(
            cfg,
            settings,
            output,
            device=str(ranks.device),
            seed=options.seed,
            overwrite=options.overwrite,
        )
    )
    notes = distributed.resolve_strategy(
        ranks, settings.distributed, len(plan.sources), settings.batch_size
    )
    if ranks.is_main:
        print_lines(notes, style="yellow")
    memory = ranks.together(lambda: memory_plan(plan, ranks))
    if options.progress and ranks.is_main:
        lines = memory.lines()
        if options.dry_run:
            lines = [*describe(plan), *ranks.describe(), *lines]
        print_lines(lines)
    ranks.together(memory.require_fits)  # before any weight is loaded, on every rank alike
    if options.dry_run:
        if options.progress and ranks.is_main:
            console.print("dry run: nothing trained or written", style="green")
        return None
    model, result = train_plan(
        plan, progress=options.progress and ranks.is_main, stop_after=stop_after, ranks=ranks
    )
    if result.steps < plan.steps:
        return None
    held = ranks.gather(held_store_bytes(model))
    if not ranks.is_main:
        return None
    summary = {
        "steps": result.steps,
        "seed": options.seed,
        "examples per source": ", ".join(str(len(d)) for d in plan.data),
        **{k: f"{v:.6g}" for k, v in result.last.items()},
    }
    out = export_merged(
        model,
        plan.base,
        plan.sources,
        plan.output,
        cfg=cfg,
        settings=plan.settings,
        shard_size=options.shard_size,
        overwrite=options.overwrite,
        out_dtype=parse_dtype(cfg.out_dtype),
        tokenizer_folder=None
        if cfg.tokenizer_source in (None, "base")
        else Path(cfg.tokenizer_source),
        chat_template=plan.chat_template,
        log_path=plan.work_dir / "train_log.jsonl",
        summary=summary,
        stats=compute_stats(plan, model, result, ranks, held),
        progress=options.progress,
    )
    if not plan.settings.keep_work:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    if options.progress:
        console.print(f"merged model written to {out}", style="green")
    return out

"""``merge_method: evolve``: validate, search, export an ordinary recipe and its checkpoint.

Order of work, so that every mistake in the recipe is reported before anything is computed:
recipe and settings → checkpoints and the start-point plan → search space → fitness data →
output location; then the sources are loaded once, the fitness prepares (teacher outputs), and
CMA-ES runs, logging every evaluation into ``OUTPUT.evolve-work/evolve_log.jsonl``. Re-running the
same command after an interruption replays that log and continues. At the end the best genome is
written as ``evolved_recipe.yml`` and merged by the normal streaming executor into OUTPUT (so the
checkpoint equals ``dammerge merge evolved_recipe.yml``), together with the log, a fitness plot
and ``evolve_stats.json``; the work folder is then removed.

The search holds every source model in memory (N + 1 models in the compute dtype) plus one
``transformers`` model: fine for small models; for 7B models plan RAM (or GPU memory with
``--device cuda``) for all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dammerge import __version__
from dammerge.checkpoint.lora import open_model
from dammerge.checkpoint.writer import CheckpointWriter, check_output_location
from dammerge.config import (
    DEFAULT_SHARD_SIZE,
    MergeConfig,
    ModelReference,
    RunOptions,
    load_config,
)
from dammerge.data.tokenizer import load_tokenizer
from dammerge.devices import resolve_device
from dammerge.errors import ConfigError, DammergeError, Interrupted, OutputError
from dammerge.evolve.candidate import InMemoryMerger, ModelSlot
from dammerge.evolve.fitness import (
    Fitness,
    FitnessContext,
    FitnessValue,
    as_fitness,
    kl_fitness_from_recipe,
    task_fitness_from_recipe,
)
from dammerge.evolve.log import EvolveLog
from dammerge.evolve.report import peak_rss_mib, plot_fitness
from dammerge.evolve.search import Outcome, Scorer, SearchResult, run_cma
from dammerge.evolve.settings import (
    EvolveSettings,
    base_method,
    read_settings,
    searched_parameters,
)
from dammerge.evolve.space import SearchSpace
from dammerge.executor import merge_tensor, write_side_files
from dammerge.memory import reuse_freed_memory
from dammerge.methods import MergeMethod
from dammerge.plan import MergePlan, build_plan, describe
from dammerge.terminal import console, print_lines

LOG_NAME = "evolve_log.jsonl"
RECIPE_NAME = "evolved_recipe.yml"
STATS_NAME = "evolve_stats.json"
PLOT_NAME = "evolve_fitness.png"
SOURCE_RECIPE_NAME = "evolve_recipe.yml"
WORK_SUFFIX = ".evolve-work"


@dataclass
class PreparedSearch:
    """Everything validated before compute."""

    cfg: MergeConfig
    settings: EvolveSettings
    method: MergeMethod
    space: SearchSpace
    plan: MergePlan
    fitness: Fitness
    popsize: int
    output: Path
    work_dir: Path
    fingerprint: str
    seed: int
    overwrite: bool

    @property
    def generations(self) -> int:
        return self.settings.budget // self.popsize

    def workers(self, device: torch.device | None = None) -> int:
        """Worker processes for scoring: 1 on CUDA (a forked CUDA context is unusable)."""
        if device is not None and device.type != "cpu":
            return 1
        wanted = self.settings.workers
        cores = os.cpu_count() or 1
        count = cores if wanted == "auto" else int(wanted)
        return max(1, min(count, self.popsize))


@dataclass
class EvolveResult:
    output: Path
    recipe: MergeConfig
    best_fitness: float
    stats: dict[str, Any] = field(default_factory=dict)


def run_evolve_merge(
    cfg: MergeConfig, settings: EvolveSettings, output: Path, options: RunOptions
) -> Path | None:
    """The registry's entry point for ``merge_method: evolve``; returns the output folder."""
    result = evolve_merge(
        cfg,
        output,
        settings=settings,
        device=options.device,
        seed=options.seed,
        overwrite=options.overwrite,
        dry_run=options.dry_run,
        shard_size=options.shard_size,
        progress=options.progress,
    )
    if result is None:
        return None
    if options.progress:
        console.print(
            f"evolved merge written to {result.output} (best fitness "
            f"{result.best_fitness:.6g}; recipe {result.output / RECIPE_NAME})",
            style="green",
            highlight=False,
        )
    return result.output


def evolve_merge(
    config: MergeConfig | dict[str, Any] | str | Path,
    output: str | Path,
    *,
    fitness: Fitness | Callable[[PreTrainedModel], Any] | None = None,
    settings: EvolveSettings | None = None,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    dry_run: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
) -> EvolveResult | None:
    """Search the recipe's space with CMA-ES and write the best merge to ``output``.

    ``fitness`` replaces the recipe's fitness (any ``model -> score`` callable or
    :class:`~dammerge.evolve.fitness.Fitness`; higher is better); ``settings`` are the recipe's
    search settings when already validated (else read from its ``training:`` block). Returns
    None for a dry run.
    """
    started = time.perf_counter()
    cfg = load_config(config)
    prepared = prepare(
        cfg,
        Path(output),
        settings=settings or read_settings(cfg),
        fitness=fitness,
        seed=seed,
        overwrite=overwrite,
    )
    if dry_run:
        if progress:
            print_lines(describe_search(prepared))
            console.print("dry run: nothing written", style="green")
        return None
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    merger, slot, setup_work = load_and_setup(prepared, torch_device)
    setup_seconds = time.perf_counter() - started
    log = EvolveLog.open(prepared.work_dir / LOG_NAME, prepared.fingerprint, restart=overwrite)
    resumed = len(log.records)
    if resumed:
        console.print(f"resuming: {resumed} evaluations replayed from {log.path}", style="cyan")
    with reuse_freed_memory():  # every candidate reuses the last one's pages
        scorer = Scorer(_evaluator(prepared, merger, slot), prepared.workers(torch_device))
        try:
            result = run_cma(
                x0=prepared.space.x0(),
                sigma0=prepared.settings.sigma0,
                popsize=prepared.popsize,
                budget=prepared.settings.budget,
                seed=seed,
                log=log,
                scorer=scorer,
                describe=prepared.space.describe,
                progress=progress,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"search stopped; its {len(log.records)} evaluations are saved in {log.path}",
                "run the same command again to resume",
            ) from None
        finally:
            scorer.close()
    search_seconds = time.perf_counter() - started - setup_seconds
    stats = {
        "setup_seconds": round(setup_seconds, 3),
        "search_seconds": round(search_seconds, 3),
        "resumed_evaluations": resumed,
        **_work_stats(prepared, result, setup_work, torch_device),
    }
    recipe = export(
        prepared,
        result,
        stats,
        started,
        device=torch_device,
        shard_size=shard_size,
        progress=progress,
    )
    shutil.rmtree(prepared.work_dir, ignore_errors=True)
    return EvolveResult(prepared.output, recipe, float(result.best.fitness or 0.0), stats)


# --------------------------------------------------------------------------- validation


def prepare(
    cfg: MergeConfig,
    output: Path,
    *,
    settings: EvolveSettings,
    fitness: Fitness | Callable[[PreTrainedModel], Any] | None,
    seed: int,
    overwrite: bool,
) -> PreparedSearch:
    """Validate the whole recipe and its inputs; nothing heavy is loaded yet."""
    method = base_method(cfg)
    params = searched_parameters(settings, method)
    if not cfg.models:
        raise ConfigError("the recipe lists no models", "add a 'models:' list")
    datasets = {m.model: m.dataset for m in cfg.models}
    first = ModelReference.parse(cfg.base_model or cfg.models[0].model)
    reference = open_model(first.model, first.lora)
    space = SearchSpace(cfg, method, params, settings, reference.architecture.num_layers)
    plan = build_plan(space.to_config(space.x0()))
    space.check_filters(plan.reference.names())
    if any(tensor.rows is not None for tensor in plan.tensors):
        raise ConfigError(
            "the recipe's tokenizer changes the embedding rows; the search merges the models "
            "in the vocabulary they share",
            "search over models that share one tokenizer, or drop tokenizer_source / tokenizer",
        )
    popsize = settings.popsize or space.default_popsize()
    if settings.budget < popsize:
        raise ConfigError(
            f"training.budget ({settings.budget}) is smaller than the population ({popsize})",
            f"give a budget of at least one generation; e.g. budget: {popsize * 10}",
        )
    if fitness is not None:
        chosen = as_fitness(fitness)
    elif settings.fitness == "kl":
        chosen = kl_fitness_from_recipe(
            settings,
            [(m.model, datasets[m.model]) for m in space.participants],
            seed,
            load_tokenizer(plan.tokenizer_folder()),
        )
    else:
        chosen = task_fitness_from_recipe(settings)
    inputs = [folder for ck in plan.inputs for folder in ck.source_folders()]
    out = check_output_location(output, inputs, overwrite=overwrite)
    work_dir = out.parent / f"{out.name}{WORK_SUFFIX}"
    if any(work_dir == p or p.is_relative_to(work_dir) for p in inputs):
        raise OutputError(f"the search's work folder {work_dir} would overlap an input model")
    fingerprint = _fingerprint(cfg, space, popsize, seed, chosen.name)
    EvolveLog.check(work_dir / LOG_NAME, fingerprint, restart=overwrite)
    return PreparedSearch(
        cfg,
        settings,
        method,
        space,
        plan,
        chosen,
        popsize,
        out,
        work_dir,
        fingerprint,
        seed,
        overwrite,
    )


def _fingerprint(
    cfg: MergeConfig, space: SearchSpace, popsize: int, seed: int, fitness: str
) -> str:
    """What makes a log replayable: the recipe (minus scheduling knobs), genes and seed."""
    recipe = cfg.model_dump(exclude_none=True)
    recipe.get("training", {}).pop("workers", None)
    identity = {
        "recipe": recipe,
        "genes": [g.label(space.model_labels) for g in space.genes],
        "popsize": popsize,
        "seed": seed,
        "fitness": fitness,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def describe_search(prepared: PreparedSearch) -> list[str]:
    space, settings = prepared.space, prepared.settings
    source_bytes = prepared.plan.held_dtype.itemsize * sum(
        int(np.prod(ck.shape(name))) for ck in prepared.plan.inputs for name in ck.names()
    )
    modules = ", ".join(m or "rest" for m in space.modules)
    lines = [
        f"evolve      CMA-ES over {prepared.method.name} parameters: {', '.join(space.params)}",
        f"genes       {space.dims} ({space.layer_groups} layer group(s) of "
        f"{space.num_layers} layers × module groups [{modules}])",
        f"budget      {settings.budget} evaluations = {prepared.generations} generations × "
        f"popsize {prepared.popsize} (sigma0 {settings.sigma0})",
        f"fitness     {prepared.fitness.name}",
        f"workers     {prepared.workers()}",
        f"memory      ~{source_bytes / 2**20:.1f} MiB of sources held in memory",
        f"output      {prepared.output} (work folder {prepared.work_dir})",
        "start point:",
    ]
    return lines + [f"  {line}" for line in describe(prepared.plan)]


# --------------------------------------------------------------------------- compute


def load_and_setup(
    prepared: PreparedSearch, device: torch.device
) -> tuple[InMemoryMerger, ModelSlot, FitnessValue]:
    """Load the sources once, build the reusable model, let the fitness prepare."""
    plan = prepared.plan
    merger = InMemoryMerger(plan, device, prepared.seed)
    slot = ModelSlot(plan.reference.folder, plan.held_dtype, device)
    names = plan.reference.names()
    slot.check_names(names)
    tokenizer = load_tokenizer(plan.tokenizer_folder())
    participants = prepared.space.participants

    def load_source(index: int) -> None:
        source = merger.source(participants[index].model)
        slot.load((name, source.get(name)) for name in names)

    context = FitnessContext(
        model=slot.model,
        tokenizer=tokenizer,
        device=device,
        load_source=load_source,
        source_names=[m.model for m in participants],
    )
    work = prepared.fitness.setup(context)
    return merger, slot, work


def _evaluator(
    prepared: PreparedSearch, merger: InMemoryMerger, slot: ModelSlot
) -> Callable[[Any], Outcome]:
    def evaluate(x: Any) -> Outcome:
        start = time.perf_counter()
        try:
            slot.load(merger.tensors(prepared.space.to_config(np.asarray(x, dtype=float))))
            value = prepared.fitness(slot.model)
            if not np.isfinite(value.score):
                return None, time.perf_counter() - start, f"non-finite fitness {value.score}"
        except DammergeError as exc:
            return None, time.perf_counter() - start, exc.message
        return value, time.perf_counter() - start, None

    return evaluate


def _work_stats(
    prepared: PreparedSearch,
    result: SearchResult,
    setup_work: FitnessValue,
    device: torch.device,
) -> dict[str, Any]:
    records = result.records
    evaluated = [r for r in records if r.fitness is not None or r.error]
    seconds = [r.seconds for r in evaluated]
    return {
        "fitness": prepared.fitness.name,
        "method": prepared.method.name,
        "searched": prepared.space.params,
        "genes": prepared.space.dims,
        "budget": prepared.settings.budget,
        "popsize": prepared.popsize,
        "generations": result.generations,
        "stop_reason": result.stop_reason,
        "evaluations": len(records),
        "evaluations_this_run": result.new_evaluations,
        "failed_evaluations": sum(1 for r in records if r.fitness is None),
        "best_fitness": result.best.fitness,
        "best_evaluation": result.best.evaluation,
        "forward_sequences": sum(r.sequences for r in records),
        # The experiment report's compute columns, in passes over one sequence.
        "forward_passes": sum(r.sequences for r in records) + setup_work.sequences,
        "backward_passes": 0,
        "fitness_evaluations": len(records),
        "forward_tokens": sum(r.tokens for r in records),
        "setup_forward_sequences": setup_work.sequences,
        "setup_forward_tokens": setup_work.tokens,
        "evaluation_seconds_total": round(sum(seconds), 3),
        "seconds_per_evaluation": round(sum(seconds) / max(1, len(seconds)), 4),
        "workers": prepared.workers(device),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "seed": prepared.seed,
        "dammerge_version": __version__,
    }


# --------------------------------------------------------------------------- export


def export(
    prepared: PreparedSearch,
    result: SearchResult,
    stats: dict[str, Any],
    started: float,
    *,
    device: torch.device,
    shard_size: int,
    progress: bool,
) -> MergeConfig:
    """Write the best genome's recipe and checkpoint (streaming executor), log, plot, stats."""
    recipe = prepared.space.to_config(np.asarray(result.best.x, dtype=float))
    plan = build_plan(recipe)
    export_start = time.perf_counter()
    writer = CheckpointWriter(prepared.output, shard_size=shard_size, overwrite=prepared.overwrite)
    with writer:
        for tensor in tqdm(plan.tensors, desc="export", unit="tensor", disable=not progress):
            merged = merge_tensor(plan, tensor, device, prepared.seed)
            writer.add(tensor.name, merged.to(plan.output_dtype(tensor)))
        write_side_files(writer, plan, prepared.seed)
        writer.write_text(
            RECIPE_NAME, _recipe_text(recipe, writer.out, result, prepared.seed, device)
        )
        writer.write_text(SOURCE_RECIPE_NAME, prepared.cfg.to_yaml(writer.out))
        writer.copy_file(prepared.work_dir / LOG_NAME)
        plot_fitness(
            result.records,
            writer.tmp / PLOT_NAME,
            f"evolve ({prepared.method.name}, fitness {prepared.fitness.name})",
        )
        stats.update(
            export_seconds=round(time.perf_counter() - export_start, 3),
            wall_seconds=round(time.perf_counter() - started, 3),
            peak_rss_mib=round(peak_rss_mib(), 1),
            peak_rss_children_mib=round(peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
        )
        writer.write_json(STATS_NAME, stats)
        writer.commit()
    return recipe


def _recipe_text(
    recipe: MergeConfig, folder: Path, result: SearchResult, seed: int, device: torch.device
) -> str:
    """The best genome as an ordinary recipe saved in ``folder`` (paths relative to it)."""
    header = (
        f"# Evolved by dammerge {__version__}: best of {len(result.records)} fitness "
        f"evaluations (fitness {result.best.fitness:.6g}, evaluation {result.best.evaluation}).\n"
        f"# Reproduce the checkpoint (from any folder) with: dammerge merge "
        f"PATH/TO/{RECIPE_NAME} OUT --seed {seed} --device {device.type}\n"
    )
    return header + recipe.to_yaml(folder)

"""Run an experiment: every (method, seed) cell merged, measured, evaluated, and reported.

The runner is deliberately plain: it expands the experiment into cells, validates all of them
before any compute starts (so a typo in the last method does not surface after an hour), then
runs each missing cell and writes the report. A cell's state lives in its own folder:

    OUT/cells/<method>/<seed-k>/model/       the merged checkpoint (written atomically)
    OUT/cells/<method>/<seed-k>/merge.json   compute of the merge (wall time, peak memory, passes)
    OUT/cells/<method>/<seed-k>/scores.json  the evaluation
    OUT/cells/<method>/<seed-k>/cell.json    what the cell computes (a key)

Each file is written only once its step is complete, so re-running a killed experiment redoes
only the missing steps. ``cell.json`` holds a key of what the cell computes (recipe, seed,
evaluation settings): a cell whose method or evaluation changed in the experiment file is
recomputed instead of silently reporting results of the old recipe. Every merge runs in a fresh
process: peak memory is then the merge's own, and a crash cannot take the runner down with it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dammerge.errors import DammergeError, Interrupted, OutputError
from dammerge.evolve.report import peak_rss_mib
from dammerge.experiment.config import ExperimentConfig, MethodSpec
from dammerge.family.manifest import Family, load_family
from dammerge.outputs import check_output_folder, write_json_atomic
from dammerge.terminal import print_lines

REFERENCE_GROUP = "reference"
EXPERIMENT_RECORD = "experiment.json"  # also what marks a folder as an experiment's


@dataclass(frozen=True)
class Cell:
    """One unit of work: a method at one seed, or a family model scored as a reference row."""

    name: str
    group: str
    folder: Path
    seed: int | None = None
    recipe: dict[str, Any] | None = None  # None for reference rows (nothing to merge)
    model_dir: Path | None = None  # the reference model, for reference rows

    @property
    def model(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.folder / "model"

    @property
    def merge_record(self) -> Path:
        return self.folder / "merge.json"

    @property
    def scores_record(self) -> Path:
        return self.folder / "scores.json"

    @property
    def key_record(self) -> Path:
        return self.folder / "cell.json"

    def key(self, evaluation: dict[str, Any]) -> str:
        """What this cell computes: its recipe, seed or reference model, and the evaluation."""
        what = {
            "recipe": self.recipe,
            "seed": self.seed,
            "model": None if self.model_dir is None else str(self.model_dir),
            "evaluation": evaluation,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    @property
    def label(self) -> str:
        return self.name if self.seed is None else f"{self.name} (seed {self.seed})"


def complete_recipe(method: MethodSpec, family: Family) -> dict[str, Any]:
    """The method's recipe with base_model and models (and their datasets) taken from the family."""
    recipe = dict(method.recipe)
    domains = method.sources or list(family.domains)
    unknown = [d for d in domains if d not in family.domains]
    if unknown:
        raise DammergeError(
            f"method {method.name!r}: the family has no domain {unknown[0]!r}",
            f"domains: {', '.join(family.domains)}",
        )
    recipe["base_model"] = str(family.model_dir("base"))
    recipe["models"] = [
        {
            "model": str(family.domains[d].specialist_dir),
            "dataset": {"path": str(family.domains[d].train), **method.dataset},
        }
        for d in domains
    ]
    return recipe


def plan_cells(config: ExperimentConfig, family: Family, out: Path) -> list[Cell]:
    """Reference rows first (base, specialists), then every method at each of its seeds."""
    cells = [
        Cell(
            name=name,
            group=REFERENCE_GROUP,
            folder=out / "cells" / f"ref-{name}",
            model_dir=family.model_dir(name),
        )
        for name in config.references
    ]
    for method in config.methods:
        recipe = complete_recipe(method, family)
        seeds = config.seeds if method.is_seeded else [None]
        for seed in seeds:
            folder = out / "cells" / method.slug
            if seed is not None:
                folder = folder / f"seed-{seed}"
            cells.append(Cell(method.name, method.group, folder, seed, recipe))
    return cells


def validate_cells(cells: list[Cell], device: str) -> None:
    """Check every recipe (inputs, shapes, datasets) before any compute; name the failing cell."""
    from dammerge.dispatch import merge

    for cell in cells:
        if cell.recipe is None:
            if not (cell.model / "config.json").is_file():
                raise DammergeError(
                    f"reference {cell.name!r}: {cell.model} is not a model folder",
                    "rebuild the family or fix `references`",
                )
            continue
        try:
            merge(
                cell.recipe,
                cell.model,
                device=device,
                seed=cell.seed or 0,
                overwrite=True,
                dry_run=True,
                progress=False,
            )
        except DammergeError as exc:
            raise DammergeError(f"cell {cell.label!r}: {exc.message}", exc.hint) from None


def _merge_in_child(recipe: dict[str, Any], out: str, seed: int, device: str, queue: Any) -> None:
    """Body of the merge process: run the merge, report compute (or the user error)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dammerge.dispatch import merge

    start = time.perf_counter()
    try:
        merge(recipe, out, seed=seed, device=device, overwrite=True, progress=False)
    except DammergeError as exc:
        queue.put({"error": exc.message, "hint": exc.hint})
        return
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the runner reports it
        sys.exit(130)
    queue.put(
        {
            "wall_seconds": time.perf_counter() - start,
            "peak_rss_bytes": int(peak_rss_mib() * 2**20),
        }
    )


def run_merge(cell: Cell, device: str) -> dict[str, Any]:
    """Merge one cell in a fresh process; return its compute record."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_merge_in_child,
        args=(cell.recipe, str(cell.model), cell.seed or 0, device, queue),
    )
    process.start()
    process.join()
    if process.exitcode != 0 or queue.empty():
        raise DammergeError(
            f"cell {cell.label!r}: the merge process died (exit code {process.exitcode})",
            "re-run the experiment: finished cells are kept",
        )
    result = queue.get()
    if "error" in result:
        raise DammergeError(f"cell {cell.label!r}: {result['error']}", result.get("hint"))
    result["method"] = cell.recipe["merge_method"] if cell.recipe else None
    result.update(_method_stats(cell.model))
    return result


def _method_stats(model: Path) -> dict[str, Any]:
    """Counts that data-informed methods record next to their output (passes, evaluations)."""
    stats: dict[str, Any] = {}
    for path in sorted(model.glob("*_stats.json")):
        stats.update(json.loads(path.read_text()))
    return stats


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a killed run never leaves a half-written record."""
    write_json_atomic(path, data, sort_keys=True)


def is_experiment_folder(out: Path) -> bool:
    """Whether ``out`` was written by an experiment (its ``experiment.json`` is there)."""
    try:
        data = json.loads((out / EXPERIMENT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"family", "methods"} <= set(data)


def check_experiment_folder(out: Path) -> Path:
    """Refuse an output folder that cannot be written, or that holds files of something other
    than an experiment (a model checkpoint, say): the runner writes ``cells/`` and ``report/``
    into it. An earlier experiment's folder is accepted: that is how a run resumes."""
    out = check_output_folder(out, "experiment folder", fill=True)
    if out.is_dir() and any(out.iterdir()) and not is_experiment_folder(out):
        raise OutputError(
            f"{out} is not empty and is not an experiment's folder",
            "choose a new or empty folder with -o (an earlier run's folder resumes it)",
        )
    return out


def run_experiment(
    config: ExperimentConfig, out: Path, *, rerun: bool = False, progress: bool = True
) -> Path:
    """Run every missing cell of ``config`` into ``out`` and write the report; return its folder."""
    from dammerge.experiment.evaluation import evaluate_cell
    from dammerge.experiment.report import write_report

    out = check_experiment_folder(Path(out))
    family = _family(config)
    cells = plan_cells(config, family, out)
    validate_cells(cells, config.device)
    write_json(out / EXPERIMENT_RECORD, config.model_dump(mode="json"))
    if rerun:
        shutil.rmtree(out / "cells", ignore_errors=True)
    evaluation = config.evaluation.model_dump(mode="json")
    try:
        for number, cell in enumerate(cells, 1):
            prefix = f"[{number}/{len(cells)}] {cell.label}"
            _forget_if_changed(cell, cell.key(evaluation), prefix)
            if cell.recipe is not None and not cell.merge_record.exists():
                print_lines([f"{prefix}: merging ({cell.recipe['merge_method']})"])
                write_json(cell.merge_record, run_merge(cell, config.device))
            if not cell.scores_record.exists():
                print_lines([f"{prefix}: evaluating"])
                scores = evaluate_cell(
                    cell.model, family, config.evaluation, config.device, progress
                )
                write_json(cell.scores_record, scores)
            else:
                print_lines([f"{prefix}: done earlier"], style="dim")
    except KeyboardInterrupt:
        finished = sum(cell.scores_record.is_file() for cell in cells)
        raise Interrupted(
            f"experiment stopped; {finished} of {len(cells)} cells are finished and kept in {out}",
            "run the same command again to compute only the missing cells",
        ) from None
    return write_report(config, cells, out, regime=family_regime(family))


def _forget_if_changed(cell: Cell, key: str, prefix: str) -> None:
    """Remove a cell's records when the experiment file now asks for something else.

    Records without a ``cell.json`` (from an older dammerge) are adopted as they are.
    """
    if cell.key_record.is_file():
        try:
            stored = json.loads(cell.key_record.read_text()).get("key")
        except (OSError, json.JSONDecodeError, AttributeError):
            stored = None
        if stored == key:
            return
        print_lines([f"{prefix}: changed since the last run, recomputing"], style="yellow")
        shutil.rmtree(cell.folder)
    write_json(cell.key_record, {"cell": cell.label, "key": key})


def family_regime(family: Family) -> str | None:
    """The family's regime from its manifest: a dammerge build without one predates the near
    regime and is ``far``; a family assembled by hand records none (None)."""
    regime = family.manifest.get("regime")
    if regime is None and "dammerge_version" in family.manifest:
        return "far"
    return regime


def _family(config: ExperimentConfig) -> Family:
    """The experiment's family, built first if the file asks (a cached build is instant)."""
    if config.build is not None:
        from dammerge.family.build import build_family

        build_family(
            config.family,
            config.build.size,
            config.build.seed,
            regime=config.build.regime,
            report=lambda message: print_lines([message], style="dim"),
        )
    return load_family(config.family)

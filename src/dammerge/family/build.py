"""``dammerge family build``: the miniature model family, built offline and deterministically.

Phases: generate the domain data -> read English prose from the standard library -> train a
byte-level BPE tokenizer -> pre-train the base -> (``near`` regime only: a multi-task warm
start of the base on a share of every domain's records) -> fully fine-tune one specialist per
domain -> score every model on a few eval records -> hash everything -> write the manifest.

Two regimes share the data, the tokenizer and the pre-training. ``far``: long, high-rate
fine-tunes of a base that never saw the domains, so the specialists end far from it and from
each other. ``near``: the base has seen every domain's format before the specialists are cut,
and each specialist is a short, low-rate fine-tune from it, so they stay in the base's basin,
as community fine-tunes of one base do (docs/family.md describes both). All of it
happens in a temporary sibling folder that is renamed into place at the very end, so a killed
build never leaves a half-written family where a user (or a test) would pick it up, and a
complete family of the same size, seed and dammerge version is reused instead of rebuilt.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dammerge.data.records import write_jsonl
from dammerge.errors import DammergeError
from dammerge.family.manifest import DEFAULT_REGIME, DOMAINS, FORMAT, MANIFEST_NAME, REGIMES
from dammerge.family.train import ModelShape, Schedule
from dammerge.memory import reuse_freed_memory
from dammerge.outputs import StagedFolder, check_output_folder

METRICS = {"lang": "translation", "math": "exact_match", "sql": "execution"}
COMPOSITIONAL_METRIC = "exact_match"
MODEL_NAMES = ("base", *DOMAINS)
BUILD_THREADS = 2


@dataclass(frozen=True)
class NearRecipe:
    """The ``near`` regime's training after pre-training.

    A multi-task warm start trains the pre-trained base on the first ``warm_start_records``
    train records of every domain at once; that model is the family's base. Each specialist is
    then a short fine-tune of it on the rest of its domain's train records, so no record is
    seen by both phases; it leaves the parts named in ``frozen`` (``embeddings``, ``lm_head``,
    ``norms``) as the base has them.

    With ``replay_every`` set, every ``replay_every``-th batch of a specialist's fine-tune comes
    from the warm start's records (all domains) rather than its own domain: rehearsal. Without
    it, a specialist's change from the base also carries forgetting the other domains, and the
    uniform average of three specialists adds those forgetting directions up, so that Model
    Soups falls below the base. With it, each change carries its own skill and little else.
    ``replay_overrides`` sets it per domain (0: that domain's fine-tune does not rehearse).

    With ``side_by_side`` set, the specialists train at the same time in worker processes, one
    thread each (as many at once as there are CPUs): a model this small gains little from a
    second thread within a step, so fine-tunes side by side finish sooner than the same ones
    one after the other. Each fine-tune runs on one thread however many run at once, so the
    family's bits do not depend on the machine's CPU count.
    """

    warm_start: Schedule
    warm_start_records: int
    finetune: Schedule
    finetune_overrides: dict[str, Schedule] = field(default_factory=dict)
    frozen: tuple[str, ...] = ()
    replay_every: int = 0
    replay_overrides: dict[str, int] = field(default_factory=dict)
    side_by_side: bool = False

    def finetune_schedule(self, domain: str) -> Schedule:
        return self.finetune_overrides.get(domain, self.finetune)

    def replay_every_for(self, domain: str) -> int:
        return self.replay_overrides.get(domain, self.replay_every)


@dataclass(frozen=True)
class FamilySpec:
    """Everything that decides what a family size is: data, tokenizer, model, training."""

    name: str
    corpus_chars: int
    vocab_size: int
    shape: ModelShape
    seq_len: int
    pretrain: Schedule
    finetune: Schedule
    n_train: int
    n_eval: int
    quality_records: int
    code_chars: int = 0
    max_example_tokens: int = 192
    finetune_overrides: dict[str, Schedule] = field(default_factory=dict)
    near: NearRecipe | None = None

    def finetune_schedule(self, domain: str) -> Schedule:
        return self.finetune_overrides.get(domain, self.finetune)


SIZES: dict[str, FamilySpec] = {
    "micro": FamilySpec(
        name="micro",
        corpus_chars=150_000,
        vocab_size=2048,
        shape=ModelShape(hidden=64, layers=2, heads=4, intermediate=192),
        seq_len=128,
        pretrain=Schedule(steps=120, batch=8, lr=3e-3, weight_decay=0.1),
        finetune=Schedule(steps=50, batch=8, lr=2e-3),
        n_train=300,
        n_eval=24,
        quality_records=6,
        near=NearRecipe(
            warm_start=Schedule(steps=40, batch=8, lr=2e-3),
            warm_start_records=100,
            finetune=Schedule(steps=20, batch=8, lr=1e-3),
            frozen=("embeddings", "lm_head", "norms"),
            replay_every=4,
        ),
    ),
    "small": FamilySpec(
        name="small",
        corpus_chars=2_000_000,
        vocab_size=4096,
        shape=ModelShape(hidden=192, layers=4, heads=4, intermediate=512),
        seq_len=128,
        pretrain=Schedule(steps=500, batch=16, lr=2e-3, weight_decay=0.1),
        # From this base, a short schedule at lr 1e-3 leaves every specialist near the base and
        # lr 5e-3 hurts maths and lang; at lr 2e-3 SQL needs ~800 steps and maths still improves
        # at 1,000, hence its longer schedule (the tuning runs are listed in docs/results/).
        finetune=Schedule(steps=800, batch=16, lr=2e-3),
        finetune_overrides={"math": Schedule(steps=1000, batch=16, lr=2e-3)},
        n_train=4000,
        n_eval=100,
        quality_records=32,
        # A constant learning rate after warm-up; maths and SQL rehearse the warm start every
        # fourth batch. Lang does not: rehearsal held its margin over the base near 0.10 on some
        # seeds, and without it the uniform soup still lands between base and specialists. Lang
        # and maths learn more slowly than SQL, hence their longer schedules (the trials behind
        # these numbers: docs/family.md, "Two regimes"). Side by side on two workers, SQL
        # follows lang, which finishes first, so maths' longer schedule costs no wall time.
        near=NearRecipe(
            warm_start=Schedule(steps=400, batch=16, lr=2e-3),
            warm_start_records=1000,
            finetune=Schedule(steps=400, batch=16, lr=1e-3, min_lr_ratio=1.0),
            finetune_overrides={
                "lang": Schedule(steps=1400, batch=16, lr=1e-3, min_lr_ratio=1.0),
                "math": Schedule(steps=1200, batch=16, lr=1e-3, min_lr_ratio=1.0),
            },
            frozen=("embeddings", "lm_head", "norms"),
            replay_every=4,
            replay_overrides={"lang": 0},
            side_by_side=True,
        ),
    ),
}


def dammerge_version() -> str:
    from dammerge import __version__

    return __version__


# --------------------------------------------------------------------------- validation


def resolve_spec(size: str | FamilySpec, regime: str = DEFAULT_REGIME) -> FamilySpec:
    """The spec of a named size (or a custom spec passed through), with a clear error.

    The regime is checked too, so that a bad ``--regime`` fails before anything is built.
    """
    if regime not in REGIMES:
        raise DammergeError(
            f"unknown family regime {regime!r}", f"choose one of: {', '.join(REGIMES)}"
        )
    if isinstance(size, FamilySpec):
        spec = size
    elif size not in SIZES:
        raise DammergeError(f"unknown family size {size!r}", f"choose one of: {', '.join(SIZES)}")
    else:
        spec = SIZES[size]
    if regime == "near" and spec.near is None:
        raise DammergeError(
            f"family size {spec.name!r} has no near regime", "build it with --regime far"
        )
    return spec


def cached_manifest(
    out: Path,
    spec: FamilySpec,
    seed: int,
    threads: int | None = None,
    regime: str = DEFAULT_REGIME,
) -> dict[str, Any] | None:
    """The manifest of a complete family in ``out`` built with the same inputs, else None.

    The inputs are the size's spec, the regime, the seed, the dammerge version and the thread
    count (which changes the bits of trained weights). A manifest without a regime was
    written before there were two, by the ``far`` recipe.
    """
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (
        manifest.get("format") == FORMAT
        and manifest.get("size") == spec.name
        and manifest.get("regime", "far") == regime
        and manifest.get("seed") == seed
        and manifest.get("dammerge_version") == dammerge_version()
        and manifest.get("spec") == spec_json(spec, regime)
        and manifest.get("threads") == (threads or build_threads())
    )
    if not same:
        return None
    expected = [out / rel / "model.safetensors" for rel in manifest.get("models", {}).values()]
    expected += [out / path for path in _data_paths(manifest)]
    return manifest if expected and all(p.is_file() for p in expected) else None


def _data_paths(manifest: dict[str, Any]) -> list[str]:
    paths = [p for d in manifest.get("domains", {}).values() for p in (d["train"], d["eval"])]
    if "compositional" in manifest:
        paths.append(manifest["compositional"]["eval"])
    return paths


def _check_output(out: Path, force: bool) -> None:
    """Refuse to build over a file or over a folder that holds something else, or where
    nothing can be written (checked before the build's minutes of compute)."""
    check_output_folder(out, "family folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "a different family" if (out / MANIFEST_NAME).is_file() else "other files"
        raise DammergeError(
            f"{out} already holds {what}",
            "pass --force to replace it, or choose an empty or new folder",
        )


# --------------------------------------------------------------------------- environment


def build_threads() -> int:
    """Threads for the build: always 2 (``DAMMERGE_THREADS`` overrides), never load-dependent.

    The thread count changes the bits: matmul kernels split reductions differently over 1 and
    2 threads, so the micro family's hash differs between them. A build is
    reproducible for the same seed *and* thread count, so the count is fixed rather than
    chosen from the machine's load, recorded in the manifest, and part of the cache key.
    Two threads is the target machine's core count; on a machine whose cores are busy with
    other work, ``DAMMERGE_THREADS=1`` is faster but builds a (slightly) different family.
    """
    override = os.environ.get("DAMMERGE_THREADS", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise DammergeError(
                f"DAMMERGE_THREADS must be a positive integer, got {override!r}",
                "unset it to use the default of 2 threads",
            )
        return int(override)
    return BUILD_THREADS


@contextlib.contextmanager
def deterministic_torch(threads: int | None = None) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms for the build, restored afterwards."""
    import torch

    threads = threads or build_threads()
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------- phases


def _tokenizer_texts(corpus: list[str], splits: dict[str, Any]) -> list[str]:
    """What the tokenizer learns from: the corpus and every training text as the models see it."""
    from dammerge.templates import alpaca_prompt

    texts = list(corpus)
    for domain in DOMAINS:
        for record in splits[domain]["train"]:
            texts.append(alpaca_prompt(record["instruction"], record["input"]))
            texts.append(record["output"])
    return texts


def _save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def content_hash(root: Path, manifest: dict[str, Any]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes), the tokenizer and the data files."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for name, rel in sorted(manifest["models"].items()):
        with safe_open(root / rel / "model.safetensors", framework="pt") as handle:
            for key in sorted(handle.keys()):
                tensor = handle.get_tensor(key).contiguous()
                digest.update(f"{name}/{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
        digest.update((root / rel / "tokenizer.json").read_bytes())
    for rel in sorted(_data_paths(manifest)):
        digest.update(rel.encode())
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def spec_json(spec: FamilySpec, regime: str) -> dict[str, Any]:
    """The spec as the manifest records it: what decided this regime's content, nothing else.

    The near recipe is left out of a ``far`` family's spec, so tuning it never invalidates a
    far build (and a far manifest reads as it did before there were two regimes).
    """
    data = json.loads(json.dumps(asdict(spec)))
    if regime == "far":
        del data["near"]
    return data


@dataclass
class BuildResult:
    """What :func:`build_family` did: the folder, its manifest, and whether it was cached."""

    root: Path
    manifest: dict[str, Any]
    cached: bool


Reporter = Callable[[str], None]


def build_family(
    out: str | Path,
    size: str | FamilySpec = "small",
    seed: int = 0,
    *,
    force: bool = False,
    report: Reporter | None = None,
    threads: int | None = None,
    regime: str = DEFAULT_REGIME,
) -> BuildResult:
    """Build the family into ``out`` (or reuse a complete identical build already there).

    ``regime`` is ``near`` or ``far`` (see the module docstring); the same seed gives the same
    data and pre-trained weights in both.
    """
    out = Path(out).expanduser().resolve()
    spec = resolve_spec(size, regime)
    if not isinstance(seed, int) or seed < 0:
        raise DammergeError(f"seed must be a non-negative integer, got {seed!r}")
    say = report or (lambda _message: None)
    if not force:
        manifest = cached_manifest(out, spec, seed, threads, regime)
        if manifest is not None:
            say(
                f"cache hit: {out} already holds the {spec.name} family "
                f"({regime} regime) with seed {seed}"
            )
            return BuildResult(out, manifest, cached=True)
    _check_output(out, force)
    with StagedFolder(out, replace=True) as staged:
        with deterministic_torch(threads), reuse_freed_memory():
            manifest = _build_into(staged.tmp, spec, seed, regime, say)
        staged.commit()
    return BuildResult(out, manifest, cached=False)


def _build_into(
    root: Path, spec: FamilySpec, seed: int, regime: str, say: Reporter
) -> dict[str, Any]:
    from dammerge.family.corpus import stdlib_code, stdlib_corpus
    from dammerge.family.tasks import generate_splits
    from dammerge.family.tokenizer import train_tokenizer

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        timings[phase] = round(now - since, 2)
        return now

    say("generating domain data")
    splits = generate_splits(seed, spec.n_train, spec.n_eval)
    data_paths = {}
    for domain, parts in splits.items():
        for split, records in parts.items():
            rel = f"data/{domain}/{split}.jsonl"
            write_jsonl(root / rel, records)
            data_paths[(domain, split)] = rel
    t = lap("data", started)

    say("reading English and code from the Python standard library")
    corpus = stdlib_corpus(spec.corpus_chars) + stdlib_code(spec.code_chars)
    t = lap("corpus", t)

    say("training the byte-level BPE tokenizer")
    tokenizer = train_tokenizer(_tokenizer_texts(corpus, splits), spec.vocab_size)
    t = lap("tokenizer", t)

    base, losses = _pretrain(spec, seed, corpus, tokenizer)
    t = lap("pretrain", t)
    if regime == "near":
        base, losses = _warm_start(spec, seed, base, splits, tokenizer)
        t = lap("warm_start", t)
    _save_model(base, tokenizer, root / "base")
    final_loss = {"base": _tail_mean(losses)}

    models = {"base": base}
    jobs = specialist_jobs(spec, regime, seed, splits)
    for domain, model, losses, seconds in _train_specialists(spec, regime, base, jobs, tokenizer):
        _save_model(model, tokenizer, root / domain)
        models[domain] = model
        final_loss[domain] = _tail_mean(losses)
        timings[f"finetune_{domain}"] = round(seconds, 2)
    t = lap("specialists", t)

    quality = measure_quality(models, tokenizer, splits, spec.quality_records)
    quality["final_train_loss"] = final_loss
    t = lap("quality", t)

    manifest = _manifest(spec, seed, regime, data_paths, quality)
    manifest["content_hash"] = content_hash(root, manifest)
    manifest["timings"] = timings
    manifest["threads"] = _threads_in_use()
    manifest["cpu_capability"] = cpu_capability()
    manifest["build_seconds"] = round(time.perf_counter() - started, 2)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _threads_in_use() -> int:
    import torch

    return torch.get_num_threads()


def cpu_capability() -> str:
    """The vector instruction set of torch's own CPU kernels ("AVX2", "AVX512", ...).

    torch picks it from the CPU at run time, and kernels of different widths round
    differently: the same seed and thread count give other bits on a host with another
    capability. ``ATEN_CPU_CAPABILITY=avx2``, set before torch loads, makes an AVX-512 host
    build what an AVX2 host builds.
    """
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _tail_mean(losses: list[float], n: int = 20) -> float:
    tail = losses[-n:]
    return round(sum(tail) / max(1, len(tail)), 4)


def _pretrain(spec: FamilySpec, seed: int, corpus: list[str], tokenizer: Any) -> tuple[Any, list]:
    from dammerge.family.train import new_model, pack_corpus, pretraining_batches, run_steps

    rows = pack_corpus(corpus, tokenizer, spec.seq_len)
    model = new_model(spec.shape, tokenizer, seed)
    batches = pretraining_batches(rows, spec.pretrain.batch, seed)
    losses = run_steps(model, batches, spec.pretrain, "pre-training base")
    return model, losses


@dataclass(frozen=True)
class Training:
    """One fine-tune: its records, schedule and frozen parts, and the records it rehearses
    (every ``replay_every``-th batch comes from ``replay``; 0: none)."""

    records: list[dict[str, Any]]
    schedule: Schedule
    frozen: tuple[str, ...] = ()
    replay: list[dict[str, Any]] = field(default_factory=list)
    replay_every: int = 0


def specialist_training(
    spec: FamilySpec, regime: str, domain: str, splits: dict[str, Any]
) -> Training:
    """How ``domain``'s specialist is trained in ``regime``.

    In the near regime the first ``warm_start_records`` records went to the warm start, so the
    specialist trains on the rest, and rehearses the warm start's records if the recipe says so
    for this domain.
    """
    records = splits[domain]["train"]
    if regime == "far":
        return Training(records, spec.finetune_schedule(domain))
    near = _near_recipe(spec)
    replay_every = near.replay_every_for(domain)
    return Training(
        records[near.warm_start_records :],
        near.finetune_schedule(domain),
        near.frozen,
        warm_start_records(spec, splits) if replay_every else [],
        replay_every,
    )


@dataclass(frozen=True)
class SpecialistJob:
    """One specialist's fine-tune: its domain, training and seed."""

    domain: str
    training: Training
    seed: int


def specialist_jobs(
    spec: FamilySpec, regime: str, seed: int, splits: dict[str, Any]
) -> list[SpecialistJob]:
    """Every specialist's fine-tune, in ``DOMAINS`` order (the i-th, from 1, seeded
    ``seed + 1000 * i``)."""
    return [
        SpecialistJob(domain, specialist_training(spec, regime, domain, splits), seed + 1000 * i)
        for i, domain in enumerate(DOMAINS, start=1)
    ]


TrainedSpecialist = tuple[str, Any, list[float], float]


def _train_specialists(
    spec: FamilySpec, regime: str, base: Any, jobs: list[SpecialistJob], tokenizer: Any
) -> Iterator[TrainedSpecialist]:
    """Each job's (domain, model, losses, seconds), in job order: one after the other on the
    build's threads, or side by side if the near recipe says so (see ``NearRecipe``)."""
    if regime == "near" and _near_recipe(spec).side_by_side:
        yield from _side_by_side(spec, base, jobs, tokenizer)
        return
    for job in jobs:
        yield _finetune_job(base, job, tokenizer, spec)


def _finetune_job(
    base: Any, job: SpecialistJob, tokenizer: Any, spec: FamilySpec, position: int | None = None
) -> TrainedSpecialist:
    started = time.perf_counter()
    model, losses = _finetune(base, job.training, job.seed, tokenizer, spec, job.domain, position)
    return job.domain, model, losses, time.perf_counter() - started


def _side_by_side(
    spec: FamilySpec, base: Any, jobs: list[SpecialistJob], tokenizer: Any
) -> Iterator[TrainedSpecialist]:
    """The jobs on one thread each, in as many worker processes as there are usable CPUs
    (in this process, one after the other, where there is only one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dammerge.threads import usable_cpus

    workers = min(len(jobs), usable_cpus())
    if workers < 2:
        with deterministic_torch(1):
            for job in jobs:
                yield _finetune_job(base, job, tokenizer, spec)
        return
    # spawn, not fork: a child forked from a process whose OpenMP pool is running can hang
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(_finetune_in_worker, base, job, tokenizer, spec, position)
            for position, job in enumerate(jobs)
        ]
        for job, future in zip(jobs, futures, strict=True):
            state, losses, seconds = future.result()
            model = copy.deepcopy(base)
            model.load_state_dict(state)
            yield job.domain, model, losses, seconds


def _finetune_in_worker(
    base: Any, job: SpecialistJob, tokenizer: Any, spec: FamilySpec, position: int
) -> tuple[dict[str, Any], list[float], float]:
    """A worker process's fine-tune, on one thread; returns the weights rather than the model
    (a state dict crosses the process boundary in shared memory)."""
    with deterministic_torch(1), reuse_freed_memory():
        _, model, losses, seconds = _finetune_job(base, job, tokenizer, spec, position)
    return model.state_dict(), losses, seconds


def warm_start_records(spec: FamilySpec, splits: dict[str, Any]) -> list[dict[str, Any]]:
    """The near regime's multi-task warm-start data: the first records of every domain."""
    count = _near_recipe(spec).warm_start_records
    return [record for domain in DOMAINS for record in splits[domain]["train"][:count]]


def _near_recipe(spec: FamilySpec) -> NearRecipe:
    if spec.near is None:
        raise DammergeError(f"family size {spec.name!r} has no near regime")
    return spec.near


def _warm_start(
    spec: FamilySpec, seed: int, pretrained: Any, splits: dict[str, Any], tokenizer: Any
) -> tuple[Any, list]:
    """The near regime's base: the pre-trained model trained on every domain at once."""
    training = Training(warm_start_records(spec, splits), _near_recipe(spec).warm_start)
    return _finetune(pretrained, training, seed + 500, tokenizer, spec, "all domains")


# The rehearsal batches of a fine-tune are shuffled with its seed plus this offset.
REPLAY_SEED_OFFSET = 7


def _finetune(
    base: Any,
    training: Training,
    seed: int,
    tokenizer: Any,
    spec: FamilySpec,
    what: str,
    position: int | None = None,
) -> tuple[Any, list]:
    """A fine-tune of a copy of ``base`` (response-only loss) of every parameter but the
    frozen parts, rehearsing ``training.replay`` if it says so (``position``: the line of its
    progress bar, for fine-tunes that run side by side)."""
    from dammerge.family.train import (
        finetuning_batches,
        freeze,
        interleaved_batches,
        response_loss,
        run_steps,
        tokenize_examples,
    )

    def batches_of(records: list[dict[str, Any]], seed: int) -> Iterator[Any]:
        examples = tokenize_examples(records, tokenizer, spec.max_example_tokens)
        return finetuning_batches(examples, training.schedule.batch, tokenizer.pad_token_id, seed)

    model = copy.deepcopy(base)
    freeze(model, training.frozen)
    batches = batches_of(training.records, seed)
    if training.replay_every:
        rehearsal = batches_of(training.replay, seed + REPLAY_SEED_OFFSET)
        batches = interleaved_batches(batches, rehearsal, training.replay_every)
    losses = run_steps(
        model, batches, training.schedule, f"fine-tuning {what}", response_loss, position
    )
    return model, losses


def measure_quality(
    models: dict[str, Any], tokenizer: Any, splits: dict[str, Any], n_records: int
) -> dict[str, Any]:
    """Greedy scores of every model on the first ``n_records`` eval records of each domain."""
    from tqdm.auto import tqdm

    from dammerge.family.quality import score_domain

    sets = {d: (splits[d]["eval"][:n_records], METRICS[d]) for d in DOMAINS}
    sets["compositional"] = (splits["compositional"]["eval"][:n_records], COMPOSITIONAL_METRIC)
    scores: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(models) * len(sets), desc="scoring models", unit="set", leave=False)
    for name, model in models.items():
        scores[name] = {}
        for domain, (records, metric) in sets.items():
            scores[name][domain] = round(score_domain(model, tokenizer, records, metric), 4)
            bar.update()
    bar.close()
    return {
        "records_per_domain": n_records,
        "metrics": {d: m for d, (_, m) in sets.items()},
        "scores": scores,
    }


def _manifest(
    spec: FamilySpec,
    seed: int,
    regime: str,
    data: dict[tuple[str, str], str],
    quality: dict[str, Any],
) -> dict[str, Any]:
    import platform

    return {
        "format": FORMAT,
        "size": spec.name,
        "regime": regime,
        "seed": seed,
        "content_hash": "",
        "dammerge_version": dammerge_version(),
        "build_seconds": 0.0,
        "complete": True,
        "python_version": platform.python_version(),
        "models": {name: name for name in MODEL_NAMES},
        "domains": {
            d: {
                "specialist": d,
                "train": data[(d, "train")],
                "eval": data[(d, "eval")],
                "metric": METRICS[d],
            }
            for d in DOMAINS
        },
        "compositional": {"eval": data[("compositional", "eval")], "metric": COMPOSITIONAL_METRIC},
        "quality": quality,
        "spec": spec_json(spec, regime),
    }


def with_steps(
    spec: FamilySpec, name: str, pretrain: int, finetune: int, warm_start: int | None = None
) -> FamilySpec:
    """A copy of ``spec`` with other step counts (cheap variants for tests and benchmarks).

    ``finetune`` applies to the specialists of both regimes, ``warm_start`` (default:
    ``finetune``) to the near regime's warm start.
    """
    near = spec.near
    if near is not None:
        warm_steps = finetune if warm_start is None else warm_start
        near = replace(
            near,
            warm_start=replace(near.warm_start, steps=warm_steps),
            finetune=replace(near.finetune, steps=finetune),
            finetune_overrides={},
        )
    return replace(
        spec,
        name=name,
        pretrain=replace(spec.pretrain, steps=pretrain),
        finetune=replace(spec.finetune, steps=finetune),
        finetune_overrides={},
        near=near,
    )

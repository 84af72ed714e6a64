"""``dammerge family build``: the miniature model family, built offline and deterministically.

Phases: generate the domain data -> read English prose from the standard library -> train a
byte-level BPE tokenizer -> pre-train the base -> fully fine-tune one specialist per domain ->
score every model on a few eval records -> hash everything -> write the manifest. All of it
happens in a temporary sibling folder that is renamed into place at the very end, so a killed
build never leaves a half-written family where a user (or a test) would pick it up, and a
complete family of the same size, seed and dammerge version is reused instead of rebuilt.
"""

from __future__ import annotations

import contextlib
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
from dammerge.family.manifest import DOMAINS, FORMAT, MANIFEST_NAME
from dammerge.family.train import ModelShape, Schedule
from dammerge.memory import reuse_freed_memory
from dammerge.outputs import StagedFolder, check_output_folder

METRICS = {"lang": "translation", "math": "exact_match", "sql": "execution"}
COMPOSITIONAL_METRIC = "exact_match"
MODEL_NAMES = ("base", *DOMAINS)
BUILD_THREADS = 2


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
    ),
}


def dammerge_version() -> str:
    from dammerge import __version__

    return __version__


# --------------------------------------------------------------------------- validation


def resolve_spec(size: str | FamilySpec) -> FamilySpec:
    """The spec of a named size (or a custom spec passed through), with a clear error."""
    if isinstance(size, FamilySpec):
        return size
    if size not in SIZES:
        raise DammergeError(f"unknown family size {size!r}", f"choose one of: {', '.join(SIZES)}")
    return SIZES[size]


def cached_manifest(
    out: Path, spec: FamilySpec, seed: int, threads: int | None = None
) -> dict[str, Any] | None:
    """The manifest of a complete family in ``out`` built with the same inputs, else None.

    The inputs are the size's spec, the seed, the dammerge version and the thread count (which
    changes the bits of trained weights).
    """
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (
        manifest.get("format") == FORMAT
        and manifest.get("size") == spec.name
        and manifest.get("seed") == seed
        and manifest.get("dammerge_version") == dammerge_version()
        and manifest.get("spec") == _spec_json(spec)
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


def _spec_json(spec: FamilySpec) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(spec)))


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
) -> BuildResult:
    """Build the family into ``out`` (or reuse a complete identical build already there)."""
    out = Path(out).expanduser().resolve()
    spec = resolve_spec(size)
    if not isinstance(seed, int) or seed < 0:
        raise DammergeError(f"seed must be a non-negative integer, got {seed!r}")
    say = report or (lambda _message: None)
    if not force:
        manifest = cached_manifest(out, spec, seed, threads)
        if manifest is not None:
            say(f"cache hit: {out} already holds the {spec.name} family with seed {seed}")
            return BuildResult(out, manifest, cached=True)
    _check_output(out, force)
    with StagedFolder(out, replace=True) as staged:
        with deterministic_torch(threads), reuse_freed_memory():
            manifest = _build_into(staged.tmp, spec, seed, say)
        staged.commit()
    return BuildResult(out, manifest, cached=False)


def _build_into(root: Path, spec: FamilySpec, seed: int, say: Reporter) -> dict[str, Any]:
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
    _save_model(base, tokenizer, root / "base")
    final_loss = {"base": _tail_mean(losses)}
    t = lap("pretrain", t)

    models = {"base": base}
    for index, domain in enumerate(DOMAINS):
        model, losses = _finetune(spec, seed + 1000 * (index + 1), base, domain, splits, tokenizer)
        _save_model(model, tokenizer, root / domain)
        models[domain] = model
        final_loss[domain] = _tail_mean(losses)
        t = lap(f"finetune_{domain}", t)

    quality = measure_quality(models, tokenizer, splits, spec.quality_records)
    quality["final_train_loss"] = final_loss
    t = lap("quality", t)

    manifest = _manifest(spec, seed, data_paths, quality)
    manifest["content_hash"] = content_hash(root, manifest)
    manifest["timings"] = timings
    manifest["threads"] = _threads_in_use()
    manifest["build_seconds"] = round(time.perf_counter() - started, 2)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _threads_in_use() -> int:
    import torch

    return torch.get_num_threads()


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


def _finetune(
    spec: FamilySpec, seed: int, base: Any, domain: str, splits: dict[str, Any], tokenizer: Any
) -> tuple[Any, list]:
    """A full fine-tune of a copy of ``base`` on ``domain``'s train split (response-only loss)."""
    import copy

    from dammerge.family.train import (
        finetuning_batches,
        response_loss,
        run_steps,
        tokenize_examples,
    )

    examples = tokenize_examples(splits[domain]["train"], tokenizer, spec.max_example_tokens)
    model = copy.deepcopy(base)
    schedule = spec.finetune_schedule(domain)
    batches = finetuning_batches(examples, schedule.batch, tokenizer.pad_token_id, seed)
    losses = run_steps(model, batches, schedule, f"fine-tuning {domain}", response_loss)
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
    spec: FamilySpec, seed: int, data: dict[tuple[str, str], str], quality: dict[str, Any]
) -> dict[str, Any]:
    import platform

    return {
        "format": FORMAT,
        "size": spec.name,
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
        "spec": _spec_json(spec),
    }


def with_steps(spec: FamilySpec, name: str, pretrain: int, finetune: int) -> FamilySpec:
    """A copy of ``spec`` with other step counts (cheap variants for tests and benchmarks)."""
    return replace(
        spec,
        name=name,
        pretrain=replace(spec.pretrain, steps=pretrain),
        finetune=replace(spec.finetune, steps=finetune),
        finetune_overrides={},
    )

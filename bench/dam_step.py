"""Cost of one DAM training step against a plain training step and the reference formulation.

Measured in ONE run, interleaved (the configurations of one N take turns, in a shuffled order
each round) and repeated (median of ``--repeats`` timed steps after ``--warmup`` untimed ones),
on random-init Llama checkpoints (untied ``lm_head``) made with :mod:`dammerge.testing` under
``bench/.work/`` (git-ignored, reused):

1. ``plain``: one model, forward + backward + AdamW over ALL its weights (next-token cross
   entropy), on the same tokens a DAM step sees: N sequences of length S in one batch;
2. ``ours_on_the_fly``: our DAM step, teachers from the weight store (``teacher(i)`` mode);
3. ``ours_precomputed``: our DAM step with top-K teacher logits precomputed to disk;
4. ``reference``: :mod:`reference_dam` (N merged forwards each saving its merged weights, N
   teacher forwards on separate model copies, one backward).

Our two DAM steps are the engine's own code path: ``dammerge.learned.train.Trainer.train_step``
on a model from ``build_merged_model`` with the ``dam`` preset's settings (KL at T = 2 plus the
cosine regulariser), teachers from ``dammerge.learned.teachers``.

Peak memory is measured at a weight-dominated size in separate subprocesses, one per variant:
the child records its RSS after its imports (the baseline), builds what it needs, runs two steps
and reports its peak RSS minus that baseline. The peak is the kernel's ``VmHWM`` of the child's
own address space: ``ru_maxrss`` would be wrong here, because on Linux a child inherits its
parent's high-water mark across fork and exec, and the harness is several GiB by then.

Freed CPU memory is kept for reuse during the timed steps and in the memory children, for every
variant alike, as the engine's own training loop does (:mod:`dammerge.memory`): without it, each
step's large tensors are fresh mappings that the kernel faults in page by page, which slowed the
plain step by ~23 % (our DAM step avoids most such tensors) and made it the noisiest variant.
``DAMMERGE_REUSE_MEMORY=0`` measures with glibc's defaults (``settings.cpu_memory_reuse``).

Both wall time and process CPU time (all threads) are recorded; the targets use wall-time
medians, CPU time is the steadier figure when other jobs share the cores. OpenMP runs with the
policy the user's training run gets: libgomp's default (workers spin briefly, then sleep) unless
``OMP_WAIT_POLICY`` is set, and the JSON records which (``machine.omp_wait_policy``). Run it
alone: on a machine whose cores other jobs use, spinning workers made a 2-thread step up to 50x
slower (the harness warns when it finds the cores busy at start). ``PASSIVE`` avoids
that but wakes the workers through the kernel on every parallel operation (~45 µs each here,
~100 µs per small GEMM), a tax in proportion to the number of operations, not their work, which
a step that merges N weight stores per layer pays more often than a plain step.

Targets (issue 4): ours ≤ 1.5× a plain step with teachers on the fly and ≤ 1.15× with precomputed
teachers, flat in N; ≥ 1.4× faster than the reference at N = 5; ≥ 1.8× less peak memory.

    .venv/bin/python bench/dam_step.py            # full run -> bench/results/dam_step.json
    .venv/bin/python bench/dam_step.py --quick    # smoke run -> bench/results/dam_step_quick.json
    python bench/dam_step.py --gpu                # a CUDA GPU -> bench/results/dam_step_gpu.json

``--gpu`` measures bf16 weights (float32 coefficients) at a TinyLlama-like width with 512-token
sequences; each step is timed between ``torch.cuda.synchronize()`` calls, and peak memory is the
CUDA caching allocator's peak of allocated bytes (one subprocess per variant, as on a CPU).

``--quick`` uses toy sizes (hidden 64) where fixed per-call overheads dominate: it checks that
everything runs, its ratios mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench scripts run as files, not as a package: import the helpers beside them
from _common import busy_warning, machine_info, timestamp, write_json
from dammerge.memory import reuse_freed_memory
from reference_dam import build_reference_merge, reference_step

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work" / "dam_step"
RESULTS = REPO / "bench" / "results"

VARIANTS = ("plain", "ours_on_the_fly", "ours_precomputed", "reference")
TARGETS = {
    "on_the_fly_vs_plain": 1.5,
    "precomputed_vs_plain": 1.15,
    "flat_in_n": 1.10,  # seconds per source at the largest N over the smallest N
    "speedup_vs_reference": 1.4,
    "memory_vs_reference": 1.8,
}
REFERENCE_CODE_RATIOS = {2: 1.7, 3: 1.9, 5: 2.15}  # issue 4: the public code, this kind of CPU
THREADS = 2


@dataclass(frozen=True)
class ModelSize:
    """A Llama-shaped model (Mistral-like proportions: GQA, MLP 4× hidden, 32k vocabulary)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def overrides(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
        }

    def tag(self) -> str:
        return (
            f"h{self.hidden}-l{self.layers}-i{self.intermediate}-a{self.heads}-"
            f"kv{self.kv_heads}-v{self.vocab}"
        )


@dataclass(frozen=True)
class BenchConfig:
    """Everything one measurement depends on (recorded in the JSON)."""

    size: ModelSize
    seq_len: int
    ns: tuple[int, ...]
    top_k: int
    warmup: int
    repeats: int
    memory_size: ModelSize
    memory_seq_len: int
    memory_n: int
    memory_steps: int
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


FULL = BenchConfig(
    size=ModelSize(hidden=256, layers=4, intermediate=1024, heads=8, kv_heads=4, vocab=32000),
    seq_len=256,
    ns=(2, 3, 5),
    top_k=64,
    warmup=2,
    repeats=7,
    memory_size=ModelSize(
        hidden=1024, layers=4, intermediate=4096, heads=16, kv_heads=8, vocab=32000
    ),
    memory_seq_len=128,
    memory_n=5,
    memory_steps=2,
)
# A lent GPU: bf16 weights (float32 coefficients), a TinyLlama-like width, 512-token sequences.
GPU_SIZE = ModelSize(hidden=2048, layers=8, intermediate=5632, heads=16, kv_heads=4, vocab=32000)
GPU = BenchConfig(
    size=GPU_SIZE,
    seq_len=512,
    ns=(2, 3, 5),
    top_k=64,
    warmup=3,
    repeats=10,
    memory_size=GPU_SIZE,
    memory_seq_len=512,
    memory_n=5,
    memory_steps=2,
    device="cuda",
    dtype="bfloat16",
)
QUICK = BenchConfig(
    size=ModelSize(hidden=64, layers=2, intermediate=256, heads=4, kv_heads=2, vocab=1000),
    seq_len=64,
    ns=(2, 3),
    top_k=16,
    warmup=1,
    repeats=2,
    memory_size=ModelSize(hidden=256, layers=2, intermediate=1024, heads=4, kv_heads=2, vocab=2000),
    memory_seq_len=32,
    memory_n=2,
    memory_steps=1,
)


# -- inputs -------------------------------------------------------------------------------------
def ensure_family(
    size: ModelSize, n: int, dtype: torch.dtype = torch.float32
) -> tuple[Path, list[Path]]:
    """A base and ``n`` perturbed 'fine-tunes' of it (created once, reused; untied)."""
    from dammerge.testing import make_tiny_model, make_variant

    root = WORK / f"{size.tag()}-{str(dtype).removeprefix('torch.')}"
    base = root / "base"
    if not (base / "done").is_file():
        make_tiny_model(
            base, "llama", seed=0, dtype=dtype, tie_word_embeddings=False, **size.overrides()
        )
        (base / "done").write_text("")
    sources = []
    for i in range(n):
        folder = root / f"ft{i}"
        if not (folder / "done").is_file():
            make_variant(base, folder, seed=100 + i)
            (folder / "done").write_text("")
        sources.append(folder)
    return base, sources


def make_data(n: int, seq_len: int, vocab: int, seed: int, examples: int = 4) -> list[Any]:
    """Per source, ``examples`` random sequences of exactly ``seq_len`` tokens (all targets)."""
    from dammerge.data.examples import Example
    from dammerge.learned.data import SourceData

    generator = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        rows = [
            Example(
                torch.randint(3, vocab, (seq_len,), generator=generator).tolist(), [True] * seq_len
            )
            for _ in range(examples)
        ]
        data.append(SourceData(rows, seed=seed, source=i, batch_size=1, pad_id=2))
    return data


def dam_settings(teacher: str, top_k: int) -> Any:
    """The ``dam`` preset exactly as a recipe gets it (KL, T = 2, cosine regulariser)."""
    from dammerge.learned.presets import DAM
    from dammerge.learned.settings import parse_settings

    return parse_settings({"teacher": teacher, "top_k": top_k}, DAM)


def teacher_files(
    sources: list[Path], data: list[Any], cfg: BenchConfig, tag: str
) -> tuple[list[Any], Path]:
    """Precompute (or reuse) the top-K teacher files; returns the checkpoints and the folder."""
    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.learned.teachers import precompute_teachers

    checkpoints = [Checkpoint(s) for s in sources]
    folder = WORK / "teachers" / tag
    precompute_teachers(
        checkpoints,
        data,
        cfg.top_k,
        folder,
        device=cfg.torch_device,
        dtype=cfg.torch_dtype,
        progress=False,
    )
    return checkpoints, folder


# -- the four steps -----------------------------------------------------------------------------
Step = Callable[[], None]


def plain_runner(base: Path, data: list[Any], cfg: BenchConfig) -> Step:
    """Forward + backward + AdamW over every weight of one model, on all N sequences at once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=cfg.torch_dtype).to(cfg.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    counter = {"step": 0}

    def step() -> None:
        batches = [d.batch(counter["step"]) for d in data]
        ids = torch.cat([b.input_ids for b in batches]).to(cfg.device)
        mask = torch.cat([b.attention_mask for b in batches]).to(cfg.device)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        counter["step"] += 1

    return step


def dam_runner(
    base: Path, sources: list[Path], data: list[Any], teacher: str, cfg: BenchConfig, tag: str
) -> tuple[Step, Any]:
    """The engine's own training step (``Trainer.train_step``) with the ``dam`` preset."""
    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.learned.model import MergeOptions, build_merged_model
    from dammerge.learned.teachers import OnTheFlyTeacher, PrecomputedTeacher
    from dammerge.learned.train import Trainer

    settings = dam_settings(teacher, cfg.top_k)
    options = MergeOptions.from_settings(settings)
    if teacher == "precomputed":
        checkpoints, folder = teacher_files(sources, data, cfg, tag)
        files = [folder / f"source-{i}.safetensors" for i in range(len(sources))]
        signal: Any = PrecomputedTeacher(files, cfg.torch_device)
    else:
        checkpoints = [Checkpoint(s) for s in sources]
    model = build_merged_model(
        Checkpoint(base),
        checkpoints,
        options,
        device=cfg.device,
        dtype=cfg.torch_dtype,
        keep_teacher_weights=teacher == "on_the_fly",
    )
    if teacher == "on_the_fly":
        signal = OnTheFlyTeacher(model)
    trainer = Trainer(
        model,
        data,
        signal,
        settings,
        WORK / "trainer",
        device=cfg.torch_device,
        progress=False,
    )
    return trainer.train_step, model


def reference_runner(sources: list[Path], data: list[Any], cfg: BenchConfig) -> Step:
    """The reference formulation: N teacher copies, a merge holding N more, one backward."""
    from transformers import AutoModelForCausalLM

    teachers = [
        AutoModelForCausalLM.from_pretrained(s, dtype=cfg.torch_dtype).to(cfg.device).eval()
        for s in sources
    ]
    merged = build_reference_merge(teachers)
    params = [p for p in merged.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    counter = {"step": 0}

    def step() -> None:
        batches = [d.batch(counter["step"]).input_ids.to(cfg.device) for d in data]
        reference_step(merged, teachers, batches, optimizer)
        counter["step"] += 1

    return step


def build_runner(variant: str, base: Path, sources: list[Path], data: list[Any], cfg, tag) -> Step:
    if variant == "plain":
        return plain_runner(base, data, cfg)
    if variant == "reference":
        return reference_runner(sources, data, cfg)
    teacher = "on_the_fly" if variant == "ours_on_the_fly" else "precomputed"
    return dam_runner(base, sources, data, teacher, cfg, tag)[0]


def synchronize(cfg: BenchConfig) -> None:
    """Wait for the GPU's queued work, so a step's time includes its kernels."""
    if cfg.torch_device.type == "cuda":
        torch.cuda.synchronize()


# -- timing -------------------------------------------------------------------------------------
def time_group(cfg: BenchConfig, n: int) -> dict[str, dict[str, list[float]]]:
    """Every variant at one N, interleaved: per round, each variant once, in a shuffled order.

    Returns wall seconds and process CPU seconds (user + sys of all threads) per timed step;
    CPU time is the steadier number on a machine shared with other jobs.
    """
    base, all_sources = ensure_family(cfg.size, max(cfg.ns), cfg.torch_dtype)
    sources = all_sources[:n]
    data = make_data(n, cfg.seq_len, cfg.size.vocab, cfg.seed)
    tag = f"{cfg.size.tag()}-s{cfg.seq_len}-n{n}-k{cfg.top_k}"
    runners = {v: build_runner(v, base, sources, data, cfg, tag) for v in VARIANTS}
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    shuffler = random.Random(cfg.seed + n)
    rounds = cfg.warmup + cfg.repeats
    for r in tqdm(range(rounds), desc=f"N={n}: interleaved steps", unit="round"):
        shuffler.shuffle(order)
        for variant in order:
            gc.collect()
            synchronize(cfg)
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[variant]()
            synchronize(cfg)
            elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
            if r >= cfg.warmup:
                samples[variant].append(elapsed)
                cpu[variant].append(used)
    del runners
    gc.collect()
    if cfg.torch_device.type == "cuda":
        torch.cuda.empty_cache()  # the next group and the memory children start from nothing
    return {"wall": samples, "cpu": cpu}


# -- memory (one subprocess per variant) ---------------------------------------------------------
def _maxrss_bytes() -> int:
    """``ru_maxrss``, recorded for reference only: on Linux a child's value starts from its
    parent's high-water mark (it survives fork and exec), so with a harness that has grown to
    several GiB it reports the harness, not the child."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS: now; VmHWM: this process's own peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the child: baseline after imports, then build + steps; report the RSS growth.

    The peak is the kernel's high-water mark of this process's RSS (``VmHWM``, which starts
    afresh at exec); the baseline is the RSS after every import and the token data exist.
    """
    torch.set_num_threads(THREADS)
    # import everything every variant could need before the baseline is taken
    import transformers  # noqa: F401

    import dammerge.learned.model
    import dammerge.learned.teachers
    import dammerge.learned.train  # noqa: F401

    cfg = _config_from_dict(spec["config"])
    n = cfg.memory_n
    data = make_data(n, cfg.memory_seq_len, cfg.memory_size.vocab, cfg.seed)
    base = Path(spec["base"])
    sources = [Path(s) for s in spec["sources"]]
    gc.collect()
    if cfg.torch_device.type == "cuda":
        return gpu_memory_child(spec, cfg, base, sources, data)
    baseline = _status_bytes("VmRSS")
    baseline_peak = _status_bytes("VmHWM")
    start = time.perf_counter()
    with reuse_freed_memory():
        step = build_runner(spec["variant"], base, sources, data, replace(cfg), spec["tag"])
        built = _status_bytes("VmRSS")
        for _ in range(cfg.memory_steps):
            step()
        peak = _status_bytes("VmHWM")
    return {
        "variant": spec["variant"],
        "baseline_rss_bytes": baseline,
        "peak_before_build_bytes": baseline_peak,
        "after_build_rss_bytes": built,
        "peak_rss_bytes": peak,
        "peak_minus_baseline_bytes": peak - baseline,
        "ru_maxrss_bytes_inherited": _maxrss_bytes(),
        "build_and_steps_s": time.perf_counter() - start,
    }


def gpu_memory_child(
    spec: dict[str, Any], cfg: BenchConfig, base: Path, sources: list[Path], data: list[Any]
) -> dict[str, Any]:
    """On a GPU the memory that matters is the device's: the caching allocator's peak of
    allocated bytes over what was allocated before the build (CUDA context excluded)."""
    torch.cuda.init()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step = build_runner(spec["variant"], base, sources, data, replace(cfg), spec["tag"])
    built = torch.cuda.memory_allocated()
    for _ in range(cfg.memory_steps):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {
        "variant": spec["variant"],
        "memory": "cuda max_memory_allocated",
        "baseline_rss_bytes": baseline,
        "after_build_rss_bytes": built,
        "peak_rss_bytes": peak,
        "peak_minus_baseline_bytes": peak - baseline,
        "build_and_steps_s": time.perf_counter() - start,
    }


def measure_memory(cfg: BenchConfig) -> dict[str, Any]:
    base, sources = ensure_family(cfg.memory_size, cfg.memory_n, cfg.torch_dtype)
    data = make_data(cfg.memory_n, cfg.memory_seq_len, cfg.memory_size.vocab, cfg.seed)
    tag = f"{cfg.memory_size.tag()}-s{cfg.memory_seq_len}-n{cfg.memory_n}-k{cfg.top_k}"
    teacher_files(sources, data, cfg, tag)  # precomputed outside the measured child
    results = {}
    for variant in tqdm(VARIANTS, desc="peak memory (subprocesses)", unit="variant"):
        spec = {
            "variant": variant,
            "config": _config_to_dict(cfg),
            "base": str(base),
            "sources": [str(s) for s in sources],
            "tag": tag,
        }
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def _config_to_dict(cfg: BenchConfig) -> dict[str, Any]:
    return asdict(cfg)


def _config_from_dict(data: dict[str, Any]) -> BenchConfig:
    fields = dict(data)
    fields["size"] = ModelSize(**fields["size"])
    fields["memory_size"] = ModelSize(**fields["memory_size"])
    fields["ns"] = tuple(fields["ns"])
    return BenchConfig(**fields)


# -- report -------------------------------------------------------------------------------------
def summarise(
    cfg: BenchConfig, samples: dict[int, dict[str, dict[str, list[float]]]]
) -> dict[str, Any]:
    timing: dict[str, Any] = {}
    for n, measured in samples.items():
        median = {v: statistics.median(s) for v, s in measured["wall"].items()}
        cpu = {v: statistics.median(s) for v, s in measured["cpu"].items()}
        timing[f"N={n}"] = {
            "median_s": median,
            "samples_s": measured["wall"],
            "ratio_vs_plain": {v: median[v] / median["plain"] for v in VARIANTS},
            "cpu_median_s": cpu,
            "cpu_samples_s": measured["cpu"],
            "cpu_ratio_vs_plain": {v: cpu[v] / cpu["plain"] for v in VARIANTS},
            "ours_on_the_fly_speedup_vs_reference": median["reference"] / median["ours_on_the_fly"],
            "ours_precomputed_speedup_vs_reference": median["reference"]
            / median["ours_precomputed"],
            "reference_code_ratio_quoted": REFERENCE_CODE_RATIOS.get(n),
        }
    return timing


def timing_trend(timing: dict[str, Any], ns: list[int], add: Callable[..., None]) -> None:
    """Flatness in N and the speed-up over the reference at the largest N.

    "Flat in N" is checked on the cost of a DAM step per source (seconds / N at the largest N
    over the smallest): the step must not grow faster than its work. The ratio to the plain
    step is recorded too but is not the criterion: the plain step has a fixed cost (AdamW
    over every weight, independent of N), so even a perfectly linear DAM step's ratio rises
    with N (``fixed_cost_growth`` estimates by how much, from the plain step's own fit).
    """
    lo, hi = timing[f"N={ns[0]}"], timing[f"N={ns[-1]}"]
    for variant in ("ours_on_the_fly", "ours_precomputed"):
        per_source = (hi["median_s"][variant] / ns[-1]) / (lo["median_s"][variant] / ns[0])
        add(
            f"flat in N: {variant} seconds per source N={ns[-1]} / N={ns[0]}",
            per_source,
            TARGETS["flat_in_n"],
            True,
        )
    add(
        f"reference / ours (on the fly), N={ns[-1]}",
        hi["ours_on_the_fly_speedup_vs_reference"],
        TARGETS["speedup_vs_reference"],
        False,
    )


def ratio_growth(timing: dict[str, Any], ns: list[int]) -> dict[str, float]:
    """Ratio to plain at the largest N over the smallest, per variant, and the growth that
    the plain step's fixed cost alone gives a step linear in N (fit plain = c + a·N)."""
    ns = sorted(ns)
    lo, hi = timing[f"N={ns[0]}"], timing[f"N={ns[-1]}"]
    growth = {
        v: hi["ratio_vs_plain"][v] / lo["ratio_vs_plain"][v]
        for v in ("ours_on_the_fly", "ours_precomputed", "reference")
    }
    slope = (hi["median_s"]["plain"] - lo["median_s"]["plain"]) / (ns[-1] - ns[0])
    fixed = lo["median_s"]["plain"] - slope * ns[0]
    growth["linear_step_from_plain_fixed_cost"] = (ns[-1] / ns[0]) * (
        lo["median_s"]["plain"] / hi["median_s"]["plain"]
    )
    growth["plain_fixed_s"] = fixed
    growth["plain_per_sequence_s"] = slope
    return growth


def targets(cfg: BenchConfig, timing: dict[str, Any], memory: dict[str, Any] | None) -> list[dict]:
    out = []

    def add(name: str, value: float, limit: float, at_most: bool) -> None:
        ok = value <= limit if at_most else value >= limit
        out.append(
            {
                "name": name,
                "value": round(value, 3),
                "target": f"{'<=' if at_most else '>='} {limit}",
                "pass": bool(ok),
            }
        )

    ns = sorted(int(k.split("=")[1]) for k in timing)
    for n in ns:
        ratios = timing[f"N={n}"]["ratio_vs_plain"]
        add(
            f"on-the-fly / plain, N={n}",
            ratios["ours_on_the_fly"],
            TARGETS["on_the_fly_vs_plain"],
            True,
        )
        add(
            f"precomputed / plain, N={n}",
            ratios["ours_precomputed"],
            TARGETS["precomputed_vs_plain"],
            True,
        )
    if len(ns) > 1:
        timing_trend(timing, ns, add)
    if memory:
        ref = memory["reference"]["peak_minus_baseline_bytes"]
        for variant in ("ours_on_the_fly", "ours_precomputed"):
            ours = memory[variant]["peak_minus_baseline_bytes"]
            add(
                f"peak memory reference / {variant}, N={cfg.memory_n}",
                ref / ours,
                TARGETS["memory_vs_reference"],
                False,
            )
    return out


def print_report(timing: dict[str, Any], memory: dict[str, Any] | None, checks: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="DAM training step (median seconds; ratio to a plain step)")
    table.add_column("N", justify="right")
    for v in VARIANTS:
        table.add_column(v, justify="right")
    table.add_column("ref / ours", justify="right")
    table.add_column("ref code (quoted)", justify="right")
    for key, row in timing.items():
        cells = [f"{row['median_s'][v]:.3f} s ({row['ratio_vs_plain'][v]:.2f}×)" for v in VARIANTS]
        quoted = row["reference_code_ratio_quoted"]
        table.add_row(
            key.split("=")[1],
            *cells,
            f"{row['ours_on_the_fly_speedup_vs_reference']:.2f}×",
            f"{quoted}×" if quoted else "-",
        )
    console.print(table)
    if memory:
        mem = Table(title="Peak memory growth over the baseline (RSS on a CPU, allocated on a GPU)")
        mem.add_column("variant")
        mem.add_column("peak − baseline", justify="right")
        mem.add_column("after build − baseline", justify="right")
        for v, row in memory.items():
            mem.add_row(
                v,
                f"{row['peak_minus_baseline_bytes'] / 2**20:.0f} MiB",
                f"{(row['after_build_rss_bytes'] - row['baseline_rss_bytes']) / 2**20:.0f} MiB",
            )
        console.print(mem)
    checks_table = Table(title="Targets")
    for col in ("check", "value", "target", "pass"):
        checks_table.add_column(col)
    for c in checks:
        checks_table.add_row(
            c["name"], f"{c['value']}", c["target"], "[green]pass" if c["pass"] else "[red]FAIL"
        )
    console.print(checks_table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke)")
    parser.add_argument(
        "--gpu", action="store_true", help="a CUDA GPU, bf16 weights, hidden 2048, 512 tokens"
    )
    parser.add_argument("--repeats", type=int, help="timed steps per variant and N")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed steps")
    parser.add_argument("--output", type=Path, help="result JSON (default bench/results/...)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # one loading bar per model would bury the results
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = QUICK if args.quick else GPU if args.gpu else FULL
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    name = "dam_step_quick" if args.quick else "dam_step_gpu" if args.gpu else "dam_step"
    output = args.output or RESULTS / f"{name}.json"
    machine = machine_info()
    if warning := busy_warning(machine):
        print(warning, file=sys.stderr)
    began = time.perf_counter()
    # As in the engine's training loop (Trainer.run), freed CPU memory is kept for reuse, for
    # every variant alike; DAMMERGE_REUSE_MEMORY=0 measures with glibc's defaults instead.
    with reuse_freed_memory() as memory_reuse:
        samples = {} if args.no_timing else {n: time_group(cfg, n) for n in cfg.ns}
    timing = summarise(cfg, samples)
    memory = None if args.no_memory else measure_memory(cfg)
    checks = targets(cfg, timing, memory)
    result = {
        "benchmark": "dam_step",
        "timestamp": timestamp(),
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "settings": {
            **_config_to_dict(cfg),
            "threads": THREADS,
            "batch": "1 sequence per source; plain step: the N sequences as one batch",
            "dam_settings": dam_settings("on_the_fly", cfg.top_k).model_dump(
                include={
                    "objective",
                    "temperature",
                    "kl_direction",
                    "lambda_cos",
                    "lr",
                    "grad_clip",
                    "granularity",
                    "parametrization",
                    "activation",
                }
            ),
            "engine_step": "dammerge.learned.train.Trainer.train_step",
            "cpu_memory_reuse": memory_reuse,
        },
        "timing": timing,
        "ratio_growth": ratio_growth(timing, cfg.ns) if len(timing) > 1 else None,
        "memory": memory,
        "targets": checks,
        "all_pass": all(c["pass"] for c in checks),
        "wall_s": time.perf_counter() - began,
    }
    write_json(output, result)
    print_report(timing, memory, checks)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
cosine regulariser), teachers from ``dammerge.learned.teachers``; per N they share one merge
module (each step first selects its own ``training.kernels`` passes) and one set of precomputed
teacher files (those of the largest N: source i's examples are the same at every N).

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

Targets on a CPU (issue 4): ours ≤ 1.5× a plain step with teachers on the fly and ≤ 1.15× with
precomputed teachers, flat in N; ≥ 1.4× faster than the reference at N = 5; ≥ 1.8× less peak
memory. On a GPU (issue 16): ≤ 1.5× / ≤ 1.15× at the 7b shape, ≤ 2× / ≤ 1.5× at the small one,
and each DAM variant's peak device memory ≤ the plain step's plus the N weight stores.

    .venv/bin/python bench/dam_step.py            # full run -> bench/results/dam_step.json
    .venv/bin/python bench/dam_step.py --quick    # smoke run -> bench/results/dam_step_quick.json
    python bench/dam_step.py --gpu                # a CUDA GPU -> bench/results/dam_step_gpu.json
    python bench/dam_step.py --gpu --shape 7b --kernels compiled,eager   # -> dam_step_gpu_7b.json

``--gpu`` measures bf16 weights (float32 coefficients) with random checkpoints drawn on the GPU
(``--work``: where; they are reused). ``--shape small`` (its default) is a TinyLlama-like width
with 512-token sequences, whose plain step is itself launch-bound; ``--shape 7b`` has
Mistral-7B's layer widths (hidden 4096, MLP 14336, 32k vocabulary, 32 query and 8 key-value
heads) at 2,048-token examples, with as many decoder layers as fit on the device beside N = 5
stores (``--layers`` sets them; on a CPU it defaults to 1, a smoke run). Each step is timed
between ``torch.cuda.synchronize()`` calls. Peak memory is taken while timing: each variant's
device bytes held between steps (its model, its optimizer state) plus the most one of its steps
allocated on top, i.e. its peak had it run alone.

``--kernels compiled,eager`` measures every DAM variant once per ``training.kernels`` value
(``ours_on_the_fly[compiled]``, ...), all sharing one merge module and one plain step; the first
step of a compiled variant includes compiling (``warmup_s``); ``kernels_ran`` records what ran.

``--quick`` uses toy sizes (hidden 64) where fixed per-call overheads dominate: it checks that
everything runs, its ratios mean nothing. ``--shape host`` is the small shape's depth at toy
widths on a CPU, compiled and eager kernels: every operator costs about its dispatch, so it
measures a step's host time, what a launch-bound GPU step waits for (a proxy for the small
shape's ratios, measurable without a GPU) -> ``dam_step_host.json``.

    .venv/bin/python bench/dam_step.py --shape host
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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

TEACHER_MODES = ("on_the_fly", "precomputed")
KERNEL_CHOICES = ("auto", "compiled", "eager", "layers")
CPU_TARGETS = {
    "on_the_fly_vs_plain": 1.5,
    "precomputed_vs_plain": 1.15,
    "flat_in_n": 1.10,  # seconds per source at the largest N over the smallest N
    "speedup_vs_reference": 1.4,
    "memory_vs_reference": 1.8,
}
# Issue 16's targets on a GPU: peak memory of a DAM step at most the plain step's plus the stores.
GPU_SMALL_TARGETS = {
    "on_the_fly_vs_plain": 2.0,
    "precomputed_vs_plain": 1.5,
    "memory_vs_plain_plus_stores": 1.0,
}
GPU_7B_TARGETS = {
    "on_the_fly_vs_plain": 1.5,
    "precomputed_vs_plain": 1.15,
    "memory_vs_plain_plus_stores": 1.0,
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
    """Everything one measurement depends on (recorded in the JSON).

    ``kernels`` lists the ``training.kernels`` values measured (each DAM variant once per
    value, on one shared merge module); ``reference`` adds the reference formulation;
    ``direct_family`` writes the random checkpoints straight from tensors made on the device
    (large shapes) instead of through ``transformers`` on the CPU.
    """

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
    shape: str = "cpu"
    kernels: tuple[str, ...] = ("auto",)
    reference: bool = True
    direct_family: bool = False
    targets: dict[str, float] = field(default_factory=lambda: dict(CPU_TARGETS))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def variants(self) -> list[str]:
        """``plain``, each DAM variant per kernels value, then ``reference`` if measured."""
        dam = [dam_variant(mode, k, self) for k in self.kernels for mode in TEACHER_MODES]
        return ["plain", *dam, *(["reference"] if self.reference else [])]


def dam_variant(teacher: str, kernels: str, cfg: BenchConfig) -> str:
    """``ours_<teacher>``, with ``[kernels]`` appended when several are compared."""
    return f"ours_{teacher}" + (f"[{kernels}]" if len(cfg.kernels) > 1 else "")


def parse_variant(variant: str, cfg: BenchConfig) -> tuple[str, str]:
    """``(teacher mode, kernels)`` of a DAM variant's name."""
    name, _, kernels = variant.removeprefix("ours_").partition("[")
    return name, kernels.rstrip("]") or cfg.kernels[0]


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
# A lent GPU, bf16 weights (float32 coefficients). "small": a TinyLlama-like width with
# 512-token sequences, whose plain step is itself launch-bound; "7b": Mistral-7B's layer widths
# (GQA 32/8) at 2,048-token examples, as many layers as fit beside N = 5 stores (see
# layers_that_fit), no reference (2N model copies).
GPU_SIZE = ModelSize(hidden=2048, layers=8, intermediate=5632, heads=16, kv_heads=4, vocab=32000)
GPU = BenchConfig(
    size=GPU_SIZE,
    seq_len=512,
    ns=(2, 3, 5),
    top_k=64,
    warmup=2,
    repeats=7,
    memory_size=GPU_SIZE,
    memory_seq_len=512,
    memory_n=5,
    memory_steps=2,
    device="cuda",
    dtype="bfloat16",
    shape="small",
    direct_family=True,
    targets=dict(GPU_SMALL_TARGETS),
)
MISTRAL_7B = ModelSize(
    hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=32000
)
GPU_7B = BenchConfig(
    size=MISTRAL_7B,
    seq_len=2048,
    ns=(2, 3, 5),
    top_k=64,
    warmup=2,
    repeats=3,
    memory_size=MISTRAL_7B,
    memory_seq_len=2048,
    memory_n=5,
    memory_steps=2,
    device="cuda",
    dtype="bfloat16",
    shape="7b",
    reference=False,
    direct_family=True,
    targets=dict(GPU_7B_TARGETS),
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
    shape="quick",
)
# "host": the small GPU shape's depth (8 layers) at toy widths, on a CPU, where every operator
# costs about its dispatch: a step's host time, which a GPU small enough to be launch-bound
# waits for. A proxy for the small shape's ratios that any machine can measure, with no
# targets of its own (the small shape's are the GPU's).
HOST = replace(
    QUICK,
    size=ModelSize(hidden=64, layers=8, intermediate=256, heads=4, kv_heads=2, vocab=1000),
    seq_len=32,
    ns=(2, 3, 5),
    warmup=5,
    repeats=21,
    shape="host",
    kernels=("compiled", "eager", "layers"),
    reference=False,
    targets={},
)
SHAPES = {"quick": QUICK, "cpu": FULL, "small": GPU, "7b": GPU_7B, "host": HOST}


def layers_that_fit(
    size: ModelSize, n: int, seq_len: int, dtype_bytes: int, capacity: int, dam_models: int = 1
) -> int:
    """Decoder layers of ``size`` that one timing process holds on a device of ``capacity``.

    Per layer: the plain model's weights, gradients and two AdamW moments (4 copies), the DAM
    merge module's ``n`` stores (per module: the DAM variants share one), and one step's saved
    activations for ``n`` sequences (the engine's planner's estimate). Outside the layers: the
    same for the embeddings and the untied head, the DAM module's embedding stack (teachers on
    the fly), and the logits with their float32 loss copies. A tenth of the device is left free.
    """
    from dammerge.learned.memory_plan import ModelShape, layer_activation_bytes

    shape = ModelShape.from_config({**replace(size, layers=1).overrides(), "head_dim": None})
    a = dtype_bytes
    per_layer = (4 + n * dam_models) * a * shape.layer_elems[0]
    per_layer += layer_activation_bytes(shape, a, n, seq_len)
    embed, head = shape.embedding_elems, shape.head_elems
    outside = 4 * a * (embed + head) + dam_models * a * (n * head + (n + 1) * embed)
    outside += n * seq_len * size.vocab * (2 * a + 8)
    room = int(0.9 * capacity) - outside
    return max(0, min(size.layers, room // per_layer))


def family_bytes(size: ModelSize, n: int, dtype_bytes: int) -> int:
    """Bytes on disk of a base and ``n`` sources of ``size``."""
    from dammerge.learned.memory_plan import ModelShape

    shape = ModelShape.from_config({**size.overrides(), "head_dim": None})
    return (n + 1) * dtype_bytes * shape.total_elems


def fitting_layers(cfg: BenchConfig, work: Path) -> int:
    """As many layers as fit on the device (see :func:`layers_that_fit`) and, as a family of
    checkpoints, in four fifths of the free disk under ``work``."""
    n, a = max(cfg.ns), torch.empty((), dtype=cfg.torch_dtype).element_size()
    _, capacity = torch.cuda.mem_get_info(cfg.torch_device)
    layers = layers_that_fit(cfg.size, n, cfg.seq_len, a, capacity)  # one shared merge module
    work.mkdir(parents=True, exist_ok=True)
    disk = int(0.8 * shutil.disk_usage(work).free)
    while layers > 1 and family_bytes(replace(cfg.size, layers=layers), n, a) > disk:
        layers -= 1
    return layers


def config_for(args: argparse.Namespace) -> BenchConfig:
    """The measured configuration from the command line (see :func:`parse_args`)."""
    shape = args.shape or ("small" if args.gpu else "quick" if args.quick else "cpu")
    cfg = SHAPES[shape]
    if args.gpu:
        cfg = replace(cfg, device="cuda", dtype="bfloat16")
    elif cfg.device != "cpu":  # a GPU shape on a CPU: a smoke run of the same code
        cfg = replace(cfg, device="cpu")
    if args.layers is not None and args.layers != "fit":
        layers = int(args.layers)
        cfg = replace(
            cfg,
            size=replace(cfg.size, layers=layers),
            memory_size=replace(cfg.memory_size, layers=layers),
        )
    elif shape == "7b" and cfg.device == "cpu":  # "fit" is a GPU's notion
        cfg = replace(
            cfg, size=replace(cfg.size, layers=1), memory_size=replace(cfg.size, layers=1)
        )
    if args.ns:
        cfg = replace(cfg, ns=tuple(args.ns), memory_n=max(args.ns))
    if args.seq_len:
        cfg = replace(cfg, seq_len=args.seq_len, memory_seq_len=args.seq_len)
    if args.kernels:
        cfg = replace(cfg, kernels=tuple(args.kernels))
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.warmup is not None:
        cfg = replace(cfg, warmup=args.warmup)
    if args.no_reference:
        cfg = replace(cfg, reference=False)
    return cfg


def needs_fit(args: argparse.Namespace, cfg: BenchConfig) -> bool:
    """Whether the layer count is still to be found on the device (``--layers fit``, or the
    7b shape on a GPU without ``--layers``)."""
    if cfg.device == "cpu":
        return False
    return args.layers == "fit" or (args.layers is None and cfg.shape == "7b")


def default_output(cfg: BenchConfig) -> Path:
    names = {
        ("quick", "cpu"): "dam_step_quick",
        ("host", "cpu"): "dam_step_host",
        ("cpu", "cpu"): "dam_step",
        ("small", "cuda"): "dam_step_gpu",
        ("7b", "cuda"): "dam_step_gpu_7b",
    }
    name = names.get((cfg.shape, cfg.device), f"dam_step_{cfg.shape}_{cfg.device}")
    return RESULTS / f"{name}.json"


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


def ensure_direct_family(
    size: ModelSize, n: int, dtype: torch.dtype, device: torch.device
) -> tuple[Path, list[Path]]:
    """:func:`ensure_family` for large shapes: each tensor drawn on ``device`` and written
    straight to a safetensors file, instead of a ``transformers`` model initialised on the CPU
    (minutes at 7B widths). The same distributions: linears and embeddings N(0, 0.02²), norms
    1; source ``i`` adds N(0, 0.02²) noise of its own seed to every tensor."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from dammerge.testing import tiny_tokenizer

    root = WORK / f"direct-{size.tag()}-{str(dtype).removeprefix('torch.')}"
    config = AutoConfig.for_model(
        "llama", **size.overrides(), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
    )
    config.dtype = dtype
    with torch.device("meta"):
        shapes = {
            k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    folders = [root / "base", *(root / f"ft{i}" for i in range(n))]
    for index, folder in enumerate(folders):
        if (folder / "done").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for t, (name, shape) in enumerate(sorted(shapes.items())):
            tensors[name] = _direct_tensor(name, shape, t, index, dtype, device).cpu()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        (folder / "done").write_text("")
    return folders[0], folders[1:]


def _direct_tensor(
    name: str, shape: torch.Size, position: int, checkpoint: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """Tensor ``name`` of checkpoint ``checkpoint`` (0: the base, i + 1: source i)."""
    generator = torch.Generator(device).manual_seed(1_000_003 * position + 17)
    if name.endswith("norm.weight"):
        value = torch.ones(shape, device=device)
    else:
        value = torch.randn(shape, generator=generator, device=device).mul_(0.02)
    if checkpoint > 0:
        generator.manual_seed(1_000_003 * position + 100 + checkpoint)
        value += torch.randn(shape, generator=generator, device=device).mul_(0.02)
    return value.to(dtype)


def family_for(cfg: BenchConfig, n: int, size: ModelSize | None = None) -> tuple[Path, list[Path]]:
    """The family of ``size`` (default: the timed size) the configuration asks for."""
    size = size or cfg.size
    if cfg.direct_family:
        return ensure_direct_family(size, n, cfg.torch_dtype, cfg.torch_device)
    return ensure_family(size, n, cfg.torch_dtype)


def make_data(n: int, seq_len: int, vocab: int, seed: int, examples: int = 4) -> list[Any]:
    """Per source, ``examples`` random sequences of exactly ``seq_len`` tokens (all targets).

    Source i's examples do not depend on ``n`` (one generator, sources in order)."""
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


def dam_settings(teacher: str, top_k: int, kernels: str = "auto") -> Any:
    """The ``dam`` preset exactly as a recipe gets it (KL, T = 2, cosine regulariser)."""
    from dammerge.learned.presets import DAM
    from dammerge.learned.settings import parse_settings

    return parse_settings({"teacher": teacher, "top_k": top_k, "kernels": kernels}, DAM)


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


def shared_teacher_files(cfg: BenchConfig, sources: list[Path]) -> list[Path]:
    """The teacher files of the largest N, computed once: source i's examples and model are
    the same at every N, so a group of n sources reads the first n."""
    n = max(cfg.ns)
    data = make_data(n, cfg.seq_len, cfg.size.vocab, cfg.seed)
    _, folder = teacher_files(
        sources[:n], data, cfg, f"{cfg.size.tag()}-s{cfg.seq_len}-k{cfg.top_k}"
    )
    return [folder / f"source-{i}.safetensors" for i in range(n)]


# -- the steps ----------------------------------------------------------------------------------
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


def dam_model(base: Path, sources: list[Path], cfg: BenchConfig, keep_teacher_weights: bool) -> Any:
    """The merge module with the ``dam`` preset's options, built by the engine."""
    from dammerge.checkpoint.reader import Checkpoint
    from dammerge.learned.model import MergeOptions, build_merged_model

    options = MergeOptions.from_settings(dam_settings("on_the_fly", cfg.top_k))
    return build_merged_model(
        Checkpoint(base),
        [Checkpoint(s) for s in sources],
        options,
        device=cfg.device,
        dtype=cfg.torch_dtype,
        keep_teacher_weights=keep_teacher_weights,
    )


def dam_step_on(
    model: Any, data: list[Any], teacher: str, kernels: str, cfg: BenchConfig, files: list[Path]
) -> Step:
    """The engine's own training step (``Trainer.train_step``) with the ``dam`` preset, on
    ``model`` (which other variants may share: each step first selects its own passes)."""
    from dammerge.learned.kernels import compile_layers, store_passes
    from dammerge.learned.teachers import OnTheFlyTeacher, PrecomputedTeacher
    from dammerge.learned.train import Trainer

    settings = dam_settings(teacher, cfg.top_k, kernels)
    if teacher == "precomputed":
        signal: Any = PrecomputedTeacher(files[: len(data)], cfg.torch_device)
    else:
        signal = OnTheFlyTeacher(model)
    trainer = Trainer(
        model, data, signal, settings, WORK / "trainer", device=cfg.torch_device, progress=False
    )
    passes = store_passes(settings.kernels, cfg.torch_device)
    layers = kernels == "layers" and passes.name == "compiled"

    def step() -> None:
        if getattr(model, "bench_kernels", None) != kernels:  # variants share the model
            model.use_passes(passes)
            compile_layers(model.model, enabled=layers)
            model.bench_kernels = kernels
        trainer.train_step()

    step.passes = passes  # type: ignore[attr-defined]  # what the variant ran (reported)
    step.layers = layers  # type: ignore[attr-defined]
    return step


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
    """One variant alone, with its own merge module (the memory children, the profiler)."""
    if variant == "plain":
        return plain_runner(base, data, cfg)
    if variant == "reference":
        return reference_runner(sources, data, cfg)
    teacher, kernels = parse_variant(variant, cfg)
    files: list[Path] = []
    if teacher == "precomputed":
        _, folder = teacher_files(sources, data, cfg, tag)
        files = [folder / f"source-{i}.safetensors" for i in range(len(sources))]
    model = dam_model(base, sources, cfg, keep_teacher_weights=teacher == "on_the_fly")
    return dam_step_on(model, data, teacher, kernels, cfg, files)


def synchronize(cfg: BenchConfig) -> None:
    """Wait for the GPU's queued work, so a step's time includes its kernels."""
    if cfg.torch_device.type == "cuda":
        torch.cuda.synchronize()


def allocated(cfg: BenchConfig) -> int:
    """Bytes the CUDA caching allocator has handed out (0 on a CPU)."""
    if cfg.torch_device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(cfg.torch_device)


@dataclass
class Group:
    """Every variant of one N, built: the steps, and on a GPU the device bytes each holds."""

    steps: dict[str, Step]
    held: dict[str, int]  # device bytes of what the variant keeps between steps
    store_bytes: int  # the N weight stores of the merged linears


def store_bytes(model: Any, streamed_only: bool = False) -> int:
    """Bytes of the merged linears' weight stores (``streamed_only``: of those that stream,
    which stay in host memory with ``offload: layers``)."""
    from dammerge.learned.layers import MergedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, MergedLinear):
            if streamed_only and module.store_source is None:
                continue
            for store in (module.weight_store(), module.bias_store()):
                if store is not None:
                    total += store.numel() * store.element_size()
    return total


def build_group(cfg: BenchConfig, n: int, files: list[Path]) -> Group:
    """The plain step, one merge module shared by every DAM variant, and the reference."""
    base, all_sources = family_for(cfg, max(cfg.ns))
    sources = all_sources[:n]
    data = make_data(n, cfg.seq_len, cfg.size.vocab, cfg.seed)
    steps: dict[str, Step] = {}
    held: dict[str, int] = {}
    before = allocated(cfg)
    steps["plain"] = plain_runner(base, data, cfg)
    held["plain"] = allocated(cfg) - before
    before = allocated(cfg)
    model = dam_model(base, sources, cfg, keep_teacher_weights=True)
    model_bytes = allocated(cfg) - before
    for kernels in cfg.kernels:
        for teacher in TEACHER_MODES:
            variant = dam_variant(teacher, kernels, cfg)
            steps[variant] = dam_step_on(model, data, teacher, kernels, cfg, files)
            held[variant] = model_bytes
    if cfg.reference:
        before = allocated(cfg)
        steps["reference"] = reference_runner(sources, data, cfg)
        held["reference"] = allocated(cfg) - before
    return Group(steps, held, store_bytes(model))


# -- timing -------------------------------------------------------------------------------------
def kernels_ran(step: Any) -> str:
    """The passes a DAM variant's steps used: compiled ones may have fallen back to eager."""
    from dammerge.learned.kernels import compile_give_ups, fallback_reason

    if step.passes.name == "compiled" and fallback_reason() is not None:
        return "eager (compiling failed)"
    name = "layers" if getattr(step, "layers", False) else step.passes.name
    if name != "eager" and compile_give_ups():
        name += " (partly eager: dynamo's recompile limit)"
    return name


def time_group(cfg: BenchConfig, n: int, files: list[Path]) -> dict[str, Any]:
    """Every variant at one N, interleaved: per round, each variant once, in a shuffled order.

    Returns wall seconds and process CPU seconds (user + sys of all threads) per timed step
    (CPU time is the steadier number on a machine shared with other jobs), the warm-up steps'
    wall seconds (the first one of a compiled variant includes compiling), and on a GPU each
    variant's peak device memory as if it ran alone: what it holds between steps (its models,
    then its optimizer state) plus the most one of its steps allocated on top.
    """
    group = build_group(cfg, n, files)
    variants = cfg.variants
    samples: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    warm: dict[str, list[float]] = {v: [] for v in variants}
    peak = dict.fromkeys(variants, 0)
    order = list(variants)
    shuffler = random.Random(cfg.seed + n)
    rounds = cfg.warmup + cfg.repeats
    gpu = cfg.torch_device.type == "cuda"
    for r in tqdm(range(rounds), desc=f"N={n}: interleaved steps", unit="round"):
        shuffler.shuffle(order)
        for variant in order:
            gc.collect()
            before = allocated(cfg)
            if gpu:
                torch.cuda.reset_peak_memory_stats(cfg.torch_device)
            start, start_cpu = time.perf_counter(), time.process_time()
            group.steps[variant]()
            synchronize(cfg)
            elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
            if gpu:
                top = torch.cuda.max_memory_allocated(cfg.torch_device) - before
                peak[variant] = max(peak[variant], group.held[variant] + top)
                group.held[variant] += allocated(cfg) - before  # state the step keeps
            if r >= cfg.warmup:
                samples[variant].append(elapsed)
                cpu[variant].append(used)
            else:
                warm[variant].append(elapsed)
    ran = {v: kernels_ran(step) for v, step in group.steps.items() if hasattr(step, "passes")}
    result: dict[str, Any] = {"wall": samples, "cpu": cpu, "warmup_wall": warm, "kernels_ran": ran}
    if gpu:
        result["memory"] = {"peak_bytes": peak, "store_bytes": group.store_bytes}
    del group
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()  # the next group starts from nothing
    return result


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


def measure_memory(cfg: BenchConfig) -> dict[str, Any]:
    """Each variant's peak RSS growth in a subprocess of its own (on a CPU; a GPU's peaks are
    taken while timing, see :func:`time_group`)."""
    base, sources = family_for(cfg, cfg.memory_n, cfg.memory_size)
    data = make_data(cfg.memory_n, cfg.memory_seq_len, cfg.memory_size.vocab, cfg.seed)
    tag = f"{cfg.memory_size.tag()}-s{cfg.memory_seq_len}-n{cfg.memory_n}-k{cfg.top_k}"
    teacher_files(sources, data, cfg, tag)  # precomputed outside the measured child
    results = {}
    for variant in tqdm(cfg.variants, desc="peak memory (subprocesses)", unit="variant"):
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
    fields["kernels"] = tuple(fields["kernels"])
    return BenchConfig(**fields)


# -- report -------------------------------------------------------------------------------------
def summarise(cfg: BenchConfig, samples: dict[int, dict[str, Any]]) -> dict[str, Any]:
    timing: dict[str, Any] = {}
    for n, measured in samples.items():
        median = {v: statistics.median(s) for v, s in measured["wall"].items()}
        cpu = {v: statistics.median(s) for v, s in measured["cpu"].items()}
        row = {
            "median_s": median,
            "samples_s": measured["wall"],
            "warmup_s": measured["warmup_wall"],
            "ratio_vs_plain": {v: median[v] / median["plain"] for v in median},
            "cpu_median_s": cpu,
            "cpu_samples_s": measured["cpu"],
            "cpu_ratio_vs_plain": {v: cpu[v] / cpu["plain"] for v in cpu},
            "kernels_ran": measured["kernels_ran"],
        }
        if cfg.reference:
            for k in cfg.kernels:
                for mode in TEACHER_MODES:
                    variant = dam_variant(mode, k, cfg)
                    key = f"{variant}_speedup_vs_reference"
                    row[key] = median["reference"] / median[variant]
            row["reference_code_ratio_quoted"] = REFERENCE_CODE_RATIOS.get(n)
        timing[f"N={n}"] = row
    return timing


def device_memory(samples: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """A GPU's peak memory per variant and N, taken while timing (None on a CPU)."""
    memory = {f"N={n}": m["memory"] for n, m in samples.items() if "memory" in m}
    if not memory:
        return None
    return {"measured": "cuda max_memory_allocated, each variant as if alone", **memory}


def timing_trend(
    cfg: BenchConfig, timing: dict[str, Any], ns: list[int], add: Callable[..., None]
) -> None:
    """Flatness in N and the speed-up over the reference at the largest N.

    "Flat in N" is checked on the cost of a DAM step per source (seconds / N at the largest N
    over the smallest): the step must not grow faster than its work. The ratio to the plain
    step is recorded too but is not the criterion: the plain step has a fixed cost (AdamW
    over every weight, independent of N), so even a perfectly linear DAM step's ratio rises
    with N (``fixed_cost_growth`` estimates by how much, from the plain step's own fit).
    """
    lo, hi = timing[f"N={ns[0]}"], timing[f"N={ns[-1]}"]
    dam = [v for v in cfg.variants if v.startswith("ours_")]
    if "flat_in_n" in cfg.targets:
        for variant in dam:
            per_source = (hi["median_s"][variant] / ns[-1]) / (lo["median_s"][variant] / ns[0])
            name = f"flat in N: {variant} seconds per source N={ns[-1]} / N={ns[0]}"
            add(name, per_source, cfg.targets["flat_in_n"], True)
    if cfg.reference and "speedup_vs_reference" in cfg.targets:
        variant = dam_variant("on_the_fly", cfg.kernels[0], cfg)
        add(
            f"reference / {variant}, N={ns[-1]}",
            hi[f"{variant}_speedup_vs_reference"],
            cfg.targets["speedup_vs_reference"],
            False,
        )


def ratio_growth(timing: dict[str, Any], ns: list[int]) -> dict[str, float]:
    """Ratio to plain at the largest N over the smallest, per variant, and the growth that
    the plain step's fixed cost alone gives a step linear in N (fit plain = c + a·N)."""
    ns = sorted(ns)
    lo, hi = timing[f"N={ns[0]}"], timing[f"N={ns[-1]}"]
    growth = {
        v: hi["ratio_vs_plain"][v] / lo["ratio_vs_plain"][v]
        for v in hi["ratio_vs_plain"]
        if v != "plain"
    }
    slope = (hi["median_s"]["plain"] - lo["median_s"]["plain"]) / (ns[-1] - ns[0])
    fixed = lo["median_s"]["plain"] - slope * ns[0]
    growth["linear_step_from_plain_fixed_cost"] = (ns[-1] / ns[0]) * (
        lo["median_s"]["plain"] / hi["median_s"]["plain"]
    )
    growth["plain_fixed_s"] = fixed
    growth["plain_per_sequence_s"] = slope
    return growth


def targets(
    cfg: BenchConfig,
    timing: dict[str, Any],
    memory: dict[str, Any] | None,
    on_device: dict[str, Any] | None = None,
) -> list[dict]:
    """The configuration's targets (``cfg.targets``) that the measurements can judge."""
    out = []
    goal = cfg.targets

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
    labels = {"on_the_fly": "on-the-fly", "precomputed": "precomputed"}
    for n in ns:
        ratios = timing[f"N={n}"]["ratio_vs_plain"]
        for kernels in cfg.kernels:
            for mode in TEACHER_MODES:
                if f"{mode}_vs_plain" not in goal:
                    continue
                variant = dam_variant(mode, kernels, cfg)
                label = labels[mode] + variant.removeprefix(f"ours_{mode}")
                add(f"{label} / plain, N={n}", ratios[variant], goal[f"{mode}_vs_plain"], True)
    if len(ns) > 1:
        timing_trend(cfg, timing, ns, add)
    if memory and "reference" in memory and "memory_vs_reference" in goal:
        ref = memory["reference"]["peak_minus_baseline_bytes"]
        for variant in [v for v in cfg.variants if v.startswith("ours_")]:
            ours = memory[variant]["peak_minus_baseline_bytes"]
            add(
                f"peak memory reference / {variant}, N={cfg.memory_n}",
                ref / ours,
                goal["memory_vs_reference"],
                False,
            )
    if on_device and "memory_vs_plain_plus_stores" in goal:
        for n in ns:
            row = on_device[f"N={n}"]
            allowed = row["peak_bytes"]["plain"] + row["store_bytes"]
            for variant in [v for v in cfg.variants if v.startswith("ours_")]:
                add(
                    f"peak memory {variant} / (plain + stores), N={n}",
                    row["peak_bytes"][variant] / allowed,
                    goal["memory_vs_plain_plus_stores"],
                    True,
                )
    return out


def print_report(
    cfg: BenchConfig,
    timing: dict[str, Any],
    memory: dict[str, Any] | None,
    on_device: dict[str, Any] | None,
    checks: list[dict],
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title="DAM training step (median seconds; ratio to a plain step)")
    table.add_column("N", justify="right")
    variants = cfg.variants
    for v in variants:
        table.add_column(escape(v), justify="right")
    if cfg.reference:
        table.add_column("ref / ours", justify="right")
        table.add_column("ref code (quoted)", justify="right")
    for key, row in timing.items():
        cells = [f"{row['median_s'][v]:.3f} s ({row['ratio_vs_plain'][v]:.2f}×)" for v in variants]
        if cfg.reference:
            quoted = row["reference_code_ratio_quoted"]
            first = dam_variant("on_the_fly", cfg.kernels[0], cfg)
            cells += [
                f"{row[f'{first}_speedup_vs_reference']:.2f}×",
                f"{quoted}×" if quoted else "-",
            ]
        table.add_row(key.split("=")[1], *cells)
    console.print(table)
    if memory:
        mem = Table(title="Peak memory growth over the baseline (RSS, one process per variant)")
        mem.add_column("variant")
        mem.add_column("peak − baseline", justify="right")
        mem.add_column("after build − baseline", justify="right")
        for v, row in memory.items():
            mem.add_row(
                escape(v),
                f"{row['peak_minus_baseline_bytes'] / 2**20:.0f} MiB",
                f"{(row['after_build_rss_bytes'] - row['baseline_rss_bytes']) / 2**20:.0f} MiB",
            )
        console.print(mem)
    if on_device:
        mem = Table(title="Peak device memory per variant (GiB; stores: the N weight stores)")
        mem.add_column("N", justify="right")
        for v in variants:
            mem.add_column(escape(v), justify="right")
        mem.add_column("stores", justify="right")
        for key, row in on_device.items():
            if not key.startswith("N="):
                continue
            cells = [f"{row['peak_bytes'][v] / 2**30:.2f}" for v in variants]
            mem.add_row(key.split("=")[1], *cells, f"{row['store_bytes'] / 2**30:.2f}")
        console.print(mem)
    if not checks:  # the host shape: a proxy without targets of its own
        return
    checks_table = Table(title="Targets")
    for col in ("check", "value", "target", "pass"):
        checks_table.add_column(col)
    for c in checks:
        checks_table.add_row(
            escape(c["name"]),
            f"{c['value']}",
            c["target"],
            "[green]pass" if c["pass"] else "[red]FAIL",
        )
    console.print(checks_table)


def _kernels(text: str) -> list[str]:
    choices = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in choices if k not in KERNEL_CHOICES]
    if unknown or not choices or len(set(choices)) != len(choices):
        raise argparse.ArgumentTypeError(
            f"expected distinct values among {', '.join(KERNEL_CHOICES)}, got {text!r}"
        )
    return choices


def _ns(text: str) -> list[int]:
    try:
        ns = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 2,3,5, got {text!r}") from None
    if not ns or ns[0] < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of sources ≥ 1, got {text!r}")
    return ns


def _layers(text: str) -> str:
    if text != "fit" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'fit', got {text!r}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="= --shape quick (smoke)")
    parser.add_argument("--gpu", action="store_true", help="on a CUDA GPU, bf16 weights")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="quick, cpu (default), small (default with --gpu: hidden 2048, 512 tokens), 7b "
        "(Mistral-7B widths, 2,048 tokens) or host (the small shape's host time, on a CPU)",
    )
    parser.add_argument(
        "--layers", type=_layers, help="decoder layers (7b on a GPU: 'fit', the default)"
    )
    parser.add_argument("--ns", type=_ns, help="numbers of sources, e.g. 2,3,5")
    parser.add_argument("--seq-len", type=int, help="tokens per example")
    parser.add_argument(
        "--kernels",
        type=_kernels,
        help="training.kernels values to compare, e.g. compiled,eager (default: auto)",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per variant and N")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant and N first")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed steps")
    parser.add_argument("--work", type=Path, help="folder of the generated models (reused)")
    parser.add_argument("--output", type=Path, help="result JSON (default bench/results/...)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.shape not in (None, "quick"):
        parser.error("--quick is --shape quick")
    if args.seq_len is not None and args.seq_len < 2:
        parser.error("--seq-len must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    global WORK
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # one loading bar per model would bury the results
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.work:
        WORK = args.work.resolve()

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = config_for(args)
    if needs_fit(args, cfg):
        layers = fitting_layers(cfg, WORK)
        cfg = replace(
            cfg,
            size=replace(cfg.size, layers=layers),
            memory_size=replace(cfg.memory_size, layers=layers),
        )
    output = args.output or default_output(cfg)
    machine = machine_info()
    if warning := busy_warning(machine):
        print(warning, file=sys.stderr)
    print(
        f"{cfg.shape} on {cfg.device}: {cfg.size.tag()}, {cfg.seq_len} tokens, N = {cfg.ns}, "
        f"kernels {', '.join(cfg.kernels)}",
        file=sys.stderr,
    )
    began = time.perf_counter()
    samples: dict[int, dict[str, Any]] = {}
    # As in the engine's training loop (Trainer.run), freed CPU memory is kept for reuse, for
    # every variant alike; DAMMERGE_REUSE_MEMORY=0 measures with glibc's defaults instead.
    with reuse_freed_memory() as memory_reuse:
        if not args.no_timing:
            files = shared_teacher_files(cfg, family_for(cfg, max(cfg.ns))[1])
            samples = {n: time_group(cfg, n, files) for n in cfg.ns}
    timing = summarise(cfg, samples)
    on_device = device_memory(samples)
    memory = None if args.no_memory or cfg.device != "cpu" else measure_memory(cfg)
    checks = targets(cfg, timing, memory, on_device)
    from dammerge.learned.kernels import compile_give_ups, fallback_reason

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
            "work": str(WORK),
        },
        "compile_fallback": fallback_reason(),
        "compile_give_ups": compile_give_ups(),  # > 0: some compiled calls ran eager
        "timing": timing,
        "ratio_growth": ratio_growth(timing, list(cfg.ns)) if len(timing) > 1 else None,
        "memory": memory or on_device,
        "targets": checks,
        "all_pass": all(c["pass"] for c in checks) if checks else None,
        "wall_s": time.perf_counter() - began,
    }
    write_json(output, result)
    print_report(cfg, timing, memory, on_device, checks)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

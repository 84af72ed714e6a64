"""Where a DAM step's time goes: torch.profiler over a few steps of each variant.

Uses ``bench/dam_step.py``'s models, data and runners (the engine's own ``Trainer.train_step``)
at one N, and prints the operators that took the most device (GPU) or CPU time, so a slow ratio
in ``dam_step.json`` can be traced to its kernels. ``--gpu`` and ``--shape`` choose that
benchmark's configuration as they do there (default: its CPU one; ``--gpu``: bf16, hidden 2048,
512 tokens), ``--kernels`` the ``training.kernels`` value of the DAM steps.

    python bench/dam_profile.py --gpu --n 5 --kernels compiled --output profile.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from torch.profiler import ProfilerActivity, profile

import dam_step
from dammerge.memory import reuse_freed_memory

VARIANTS = ("plain", "ours_on_the_fly", "ours_precomputed")


def timed(step, cfg: dam_step.BenchConfig, repeats: int) -> float:
    """Median wall seconds of ``repeats`` steps (after the profiled ones warmed everything)."""
    samples = []
    for _ in range(repeats):
        dam_step.synchronize(cfg)
        start = time.perf_counter()
        step()
        dam_step.synchronize(cfg)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def profile_variant(
    variant: str, base, sources, data, cfg: dam_step.BenchConfig, tag: str, args
) -> list[str]:
    """Two warm-up steps, ``args.steps`` profiled ones, then the median of five timed ones."""
    gpu = cfg.torch_device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sort_key = "self_device_time_total" if gpu else "self_cpu_time_total"
    step = dam_step.build_runner(variant, base, sources, data, cfg, tag)
    for _ in range(2):
        step()
    dam_step.synchronize(cfg)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        dam_step.synchronize(cfg)
    median = timed(step, cfg, 5)
    table = prof.key_averages().table(
        sort_by=sort_key, row_limit=args.rows, max_name_column_width=60
    )
    return [f"\n== {variant}: median step {median * 1000:.1f} ms", table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the benchmark's GPU configuration")
    parser.add_argument("--shape", choices=sorted(dam_step.SHAPES), help="as in dam_step.py")
    parser.add_argument("--layers", help="decoder layers or 'fit' (as in dam_step.py)")
    parser.add_argument(
        "--kernels", choices=dam_step.KERNEL_CHOICES, default="auto", help="training.kernels"
    )
    parser.add_argument("--n", type=int, default=5, help="source models")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per variant")
    parser.add_argument("--output", type=Path, help="also write the report here")
    parser.add_argument("--work", type=Path, help="folder of the generated models (reused)")
    args = parser.parse_args(argv)
    if args.work:  # the models dam_step.py made there (gpu_checks.sh: /dev/shm)
        dam_step.WORK = args.work.resolve()
    options = argparse.Namespace(
        **{key: None for key in ("ns", "seq_len", "repeats", "warmup")},
        quick=False,
        gpu=args.gpu,
        shape=args.shape,
        layers=args.layers,
        kernels=[args.kernels],
        no_reference=True,
    )
    cfg = dam_step.config_for(options)
    if dam_step.needs_fit(options, cfg):
        layers = dam_step.fitting_layers(cfg, dam_step.WORK)
        cfg = dam_step.replace(cfg, size=dam_step.replace(cfg.size, layers=layers))
    gpu = cfg.torch_device.type == "cuda"
    base, sources = dam_step.family_for(cfg, args.n)
    data = dam_step.make_data(args.n, cfg.seq_len, cfg.size.vocab, cfg.seed)
    tag = f"{cfg.size.tag()}-s{cfg.seq_len}-n{args.n}-k{cfg.top_k}"
    report = [f"DAM step profile: N={args.n}, {cfg.size.tag()}, {cfg.dtype}, {cfg.device}"]
    for variant in VARIANTS:
        with reuse_freed_memory():  # as in the engine's training loop and in dam_step.py
            report += profile_variant(variant, base, sources, data, cfg, tag, args)
        if gpu:
            torch.cuda.empty_cache()
    text = "\n".join(report)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

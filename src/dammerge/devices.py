"""Device helpers shared by every engine: a user's ``--device`` string as a usable device."""

from __future__ import annotations

import os

import torch

from dammerge.errors import DammergeError


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a one-line error (CUDA asked for but absent, a typo, an index
    past the visible GPUs)."""
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DammergeError("--device cuda was asked for but no CUDA GPU is visible", "use cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DammergeError(f"unknown device {device!r}", "use cpu or cuda") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise DammergeError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible",
            "use cuda or cuda:0",
        )
    if resolved.type == "cuda":
        pin_host_memory_by_registering()
    return resolved


# torch's settings for pinned (page-locked) host memory: pin by registering ordinary pages
# from several threads (cudaHostRegister) rather than with cudaHostAlloc
PINNED_BY_REGISTERING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
ALLOCATOR_SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def pin_host_memory_by_registering() -> None:
    """Have torch pin host memory with ``cudaHostRegister`` over eight threads.

    The merge executor and streamed DAM stores read into pinned memory so that copies to the
    GPU overlap compute. ``cudaHostAlloc`` pins on one thread under a global lock, and in a
    profiled GPU merge it cost more than the merging (docs/performance.md). Settings the user
    gave (any of torch's allocator variables) are kept, and
    nothing changes once CUDA is initialised (torch has read its settings by then). Called
    only for CUDA devices: a CPU build of torch does not know these keys.
    """
    if torch.cuda.is_initialized() or any(os.environ.get(name) for name in ALLOCATOR_SETTINGS):
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = PINNED_BY_REGISTERING

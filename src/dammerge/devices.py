"""Device helpers shared by every engine: a user's ``--device`` string as a usable device."""

from __future__ import annotations

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
    return resolved

"""Candidates merged in memory: sources loaded once, one reusable model, no checkpoint per try.

An evolutionary search scores hundreds of merges. Writing each to disk and loading it back
would cost more than scoring it, so the sources' tensors are read once into memory (N + 1 models:
the search needs RAM for all of them), each candidate recipe is planned with the same
:func:`dammerge.plan.build_plan` and merged with the same :func:`dammerge.executor.merge_tensor`
as ``dammerge merge`` (so a candidate's tensors are exactly those its exported recipe gives),
and the result is copied in place into one ``transformers`` model that is reused for every
candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dammerge.checkpoint.reader import Checkpoint
from dammerge.config import MergeConfig, ModelReference
from dammerge.errors import CheckpointError
from dammerge.executor import merge_tensor
from dammerge.plan import MergePlan, build_plan


class InMemoryCheckpoint:
    """A checkpoint's tensors held in memory (float tensors already in the compute dtype).

    It answers the few questions the executor asks a :class:`Checkpoint` (``path``, ``folder``,
    ``name``, ``get``), so a plan can point at it instead of the file.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
        self.path = checkpoint.path
        self.folder = checkpoint.folder
        self.name = checkpoint.name
        self._tensors: dict[str, torch.Tensor] = {}
        for name in checkpoint.names():
            tensor = checkpoint.get(name)
            if tensor.dtype.is_floating_point:
                tensor = tensor.to(device=device, dtype=dtype)
            self._tensors[name] = tensor.clone()

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def names(self) -> list[str]:
        return list(self._tensors)


class InMemoryMerger:
    """Merges candidate recipes from sources held in memory."""

    def __init__(self, plan: MergePlan, device: torch.device, seed: int) -> None:
        self.device = device
        self.seed = seed
        self.sources = {
            ck.path: InMemoryCheckpoint(ck, plan.held_dtype, device) for ck in plan.inputs
        }

    def plan_for(self, cfg: MergeConfig) -> MergePlan:
        """The executor's plan for ``cfg``, reading from memory instead of the files. The
        candidate's tensors need no tokenizer (the search refuses recipes whose tokenizer
        changes the embedding rows), so none is loaded for each candidate."""
        untokenized = {"tokenizer_source": None, "tokenizer": None, "chat_template": None}
        plan = build_plan(cfg.model_copy(update=untokenized))
        return replace(
            plan,
            reference=self.sources[plan.reference.path],  # type: ignore[arg-type]
            base=self.sources[plan.base.path] if plan.base is not None else None,  # type: ignore[arg-type]
            participants=[self.sources[ck.path] for ck in plan.participants],  # type: ignore[misc]
        )

    def tensors(self, cfg: MergeConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Every merged tensor of the candidate ``cfg``, in checkpoint order."""
        plan = self.plan_for(cfg)
        for tensor in plan.tensors:
            yield tensor.name, merge_tensor(plan, tensor, self.device, self.seed)

    def source(self, reference: str | Path) -> InMemoryCheckpoint:
        """The source a recipe's model reference names (a folder, or ``base+adapter``)."""
        return self.sources[ModelReference.parse(str(reference)).key]


class ModelSlot:
    """One ``transformers`` model whose weights are overwritten in place for each candidate.

    Copying into existing parameters keeps tied weights tied and avoids re-allocating a model
    per candidate; buffers that checkpoints do not hold (rotary tables) stay as loaded.
    """

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.model: PreTrainedModel = model.to(device).eval()
        self._targets = self.model.state_dict()

    def check_names(self, names: Iterable[str]) -> None:
        missing = [name for name in names if name not in self._targets]
        if missing:
            raise CheckpointError(
                f"transformers' model has no parameter {missing[0]!r} that the checkpoint "
                f"holds ({len(missing)} such tensors)",
                "evolve needs checkpoints whose tensor names match the transformers model",
            )

    @torch.no_grad()
    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self._targets[name].copy_(tensor)

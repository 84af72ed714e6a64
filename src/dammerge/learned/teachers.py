"""Teacher signals: on the fly from the weight store, or precomputed top-K logits on disk.

*On the fly*: teacher i is the merge module itself in ``teacher(i)`` mode (source i's own
linears, embeddings and norms, selected from the store), so no second copy of any weight exists.
The trainer runs every source's teacher in one forward over the step's stacked batch
(``teachers(sources)`` mode: batched matrix products over the stores), so a step makes one
teacher forward instead of N: the same arithmetic, N times fewer operations for the host to
queue, which on a GPU is what small layers wait for.

*Precomputed*: before training, each source model is loaded alone (one at a time) and the top-K
logits of every position of its representative data are written to
``WORK/teachers/source-<i>.safetensors`` (values float32, indices int32, row offsets per
example). Training then holds only the merge; the files are reused on resume when their
fingerprint (model files, tokens, K, dtype) matches. Across ranks, source i's file is
computed by rank ``i mod K`` alone and read by all (the work folder must be shared).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from dammerge.checkpoint.reader import Checkpoint
from dammerge.data.examples import Batch, collate
from dammerge.learned.data import SourceData
from dammerge.learned.model import MergedModel

PRECOMPUTE_BATCH = 8


@dataclass
class TeacherOutput:
    """Full logits, or the top-K (values, indices) of each position."""

    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None


class OnTheFlyTeacher:
    """Teacher i = the merge module with source i selected (no extra weights)."""

    def __init__(self, model: MergedModel) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, source: int, batch: Batch) -> TeacherOutput:
        with self.model.teacher(source):
            return TeacherOutput(logits=self.model(batch.input_ids, batch.attention_mask))

    @torch.no_grad()
    def batched(self, sources: list[int], batch: Batch) -> TeacherOutput:
        """Several teachers in one forward: ``batch`` is ``len(sources)`` equal groups of rows,
        group g for teacher ``sources[g]`` (logits of every row, in the batch's order)."""
        with self.model.teachers(sources):
            return TeacherOutput(logits=self.model(batch.input_ids, batch.attention_mask))


class LockstepTeacher:
    """An on-the-fly teacher whose forwards every rank of a sharded merge makes together.

    FSDP gathers each layer's store on every rank for every forward, so all ranks must run the
    same number of them. A rank makes one forward for all its sources when they have equal
    numbers of rows (:meth:`batched`), else one per source; :meth:`finish_step` (called before
    the backward) runs the forwards it still owes, on a one-token input, up to
    ``calls_per_step`` (the most any rank makes: ``Distributed.teacher_calls_per_step``).
    """

    def __init__(self, teacher: OnTheFlyTeacher, calls_per_step: int) -> None:
        self.teacher = teacher
        self.calls_per_step = calls_per_step
        self.calls = 0

    def __call__(self, source: int, batch: Batch) -> TeacherOutput:
        self._count()
        return self.teacher(source, batch)

    def batched(self, sources: list[int], batch: Batch) -> TeacherOutput:
        """Every source's teacher in one forward (one call of the step's count)."""
        self._count()
        return self.teacher.batched(sources, batch)

    def _count(self) -> None:
        self.calls += 1
        if self.calls > self.calls_per_step:  # the other ranks would wait for it forever
            raise RuntimeError(
                f"teacher forward {self.calls} in a step where ranks agreed on "
                f"{self.calls_per_step}: the step's split over ranks changed"
            )

    @torch.no_grad()
    def finish_step(self) -> None:
        model = self.teacher.model
        device = next(p.device for p in model.coefficient_parameters())
        token = torch.zeros((1, 1), dtype=torch.long, device=device)
        for _ in range(self.calls, self.calls_per_step):
            with model.teacher(0):
                model(token)
        self.calls = 0


class PrecomputedTeacher:
    """Reads top-K teacher logits back from the files :func:`precompute_teachers` wrote."""

    def __init__(self, files: list[Path], device: torch.device) -> None:
        self.device = device
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._offsets = [h.get_tensor("offsets").tolist() for h in self._handles]

    def __call__(self, source: int, batch: Batch) -> TeacherOutput:
        handle, offsets = self._handles[source], self._offsets[source]
        length = batch.input_ids.shape[1]
        rows_v, rows_i = [], []
        for index in batch.indices:
            start, end = offsets[index], offsets[index + 1]
            values = handle.get_slice("values")[start:end]
            indices = handle.get_slice("indices")[start:end]
            pad = length - (end - start)
            rows_v.append(torch.nn.functional.pad(values, (0, 0, 0, pad)))
            rows_i.append(torch.nn.functional.pad(indices, (0, 0, 0, pad)))
        return TeacherOutput(
            values=to_device(torch.stack(rows_v), self.device),
            indices=to_device(torch.stack(rows_i), self.device),
        )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (in host memory) on ``device``; to a GPU through page-locked memory without
    waiting: a plain copy from pageable memory makes the host wait until the GPU has run
    everything queued before it, which in the middle of a step leaves the GPU idle while the
    host then queues the next kernels."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def teacher_fingerprint(source: Checkpoint, data: SourceData, top_k: int, dtype: str) -> str:
    digest = hashlib.sha256()
    for file in source.files():
        stat = file.stat()
        digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(f"{data.fingerprint()}:{top_k}:{dtype}".encode())
    return digest.hexdigest()


def _existing(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("fingerprint") == fingerprint
    except Exception:  # a truncated file from a killed run: recompute it
        return False


@torch.no_grad()
def precompute_source(
    source: Checkpoint,
    data: SourceData,
    top_k: int,
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    fingerprint: str,
    progress: bool = True,
) -> None:
    """Write the top-K logits of every position of ``data`` under ``source`` to ``path``."""
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype).to(device).eval()
    values_parts, index_parts, offsets = [], [], [0]
    order = list(range(len(data)))
    bar = tqdm(
        range(0, len(order), PRECOMPUTE_BATCH),
        desc=f"teacher {source.name}: top-{top_k} logits",
        unit="batch",
        disable=not progress,
    )
    for start in bar:
        chunk = order[start : start + PRECOMPUTE_BATCH]
        batch = collate([data.examples[i] for i in chunk], chunk, data.pad_id).to(device)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).logits
        top = logits.topk(top_k, dim=-1)  # widen only the K kept values, not the logits
        for b, i in enumerate(chunk):
            n = len(data.examples[i].input_ids)
            values_parts.append(top.values[b, :n].float().cpu())
            index_parts.append(top.indices[b, :n].to(torch.int32).cpu())
            offsets.append(offsets[-1] + n)
    del model
    tensors = {
        "values": torch.cat(values_parts).contiguous(),
        "indices": torch.cat(index_parts).contiguous(),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"fingerprint": fingerprint, "top_k": str(top_k)})
    partial.replace(path)


def precompute_teacher_files(
    sources: list[Checkpoint],
    data: list[SourceData],
    top_k: int,
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[Path]:
    """Precompute (or reuse) the top-K logits of the sources this rank owns (``i mod
    world_size == rank``); returns every source's file path."""
    files = []
    for i, (source, source_data) in enumerate(zip(sources, data, strict=True)):
        path = folder / f"source-{i}.safetensors"
        files.append(path)
        if i % world_size != rank:
            continue
        fingerprint = teacher_fingerprint(source, source_data, top_k, str(dtype))
        if not _existing(path, fingerprint):
            precompute_source(
                source,
                source_data,
                top_k,
                path,
                device=device,
                dtype=dtype,
                fingerprint=fingerprint,
                progress=progress,
            )
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "teachers.json").write_text(
            json.dumps({"sources": [str(s.path) for s in sources], "top_k": top_k}, indent=2)
        )
    return files


def precompute_teachers(
    sources: list[Checkpoint],
    data: list[SourceData],
    top_k: int,
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> PrecomputedTeacher:
    """Precompute (or reuse) every source's top-K logits in one process; returns their reader."""
    files = precompute_teacher_files(
        sources, data, top_k, folder, device=device, dtype=dtype, progress=progress
    )
    return PrecomputedTeacher(files, device)

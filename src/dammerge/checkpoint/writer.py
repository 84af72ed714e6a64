"""Atomic, sharded writing of a merged checkpoint.

Everything goes into a temporary sibling folder (``.NAME.dammerge-tmp-PID``) and is renamed into
place only when the last byte is on disk, so a failed, interrupted or killed merge never leaves
a half-written model where the user expects a complete one. Stale temporary folders of dead
processes are cleaned up on the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as _safetensors_save_file

from dammerge.errors import OutputError
from dammerge.outputs import (
    TMP_MARKER,
    StagedFolder,
    check_output_folder,
    clean_stale_temporaries,
    output_error,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
__all__ = [
    "TMP_MARKER",
    "CheckpointWriter",
    "TensorSpec",
    "check_output_location",
    "clean_stale_temporaries",
]


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """The name, shape and dtype of one tensor a writer will be given."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def header_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The start of a safetensors file holding ``specs`` in order: the header's length (8 bytes,
    little-endian) and the JSON header, padded with spaces so the data starts 8-byte aligned
    (as safetensors writes it)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The memory of a CPU, contiguous tensor as bytes, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def save_file(
    tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file like ``safetensors.torch.save_file``, without its copy.

    safetensors first turns every tensor into a ``bytes`` object, so flushing a 5 GB shard
    briefly needs 10 GB; here the header goes out first and then each (CPU, contiguous)
    tensor's own memory, so a flush needs no memory beyond the shard itself.
    """
    if any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()):
        _safetensors_save_file(tensors, filename, metadata=metadata)
        return
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with open(filename, "wb") as handle:
        handle.write(header_bytes(specs, metadata))
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(tensor_bytes(tensor))


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the open file ``fd`` (one ``pwrite`` writes at
    most ~2 GiB, so it loops)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def split_into_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Consecutive groups of ``specs`` of at most ``shard_size`` bytes each (a tensor larger
    than that alone): the groups :meth:`CheckpointWriter.add` flushes when given them in order."""
    shards: list[list[TensorSpec]] = []
    pending: list[TensorSpec] = []
    pending_bytes = 0
    for spec in specs:
        if pending and pending_bytes + spec.nbytes > shard_size:
            shards.append(pending)
            pending, pending_bytes = [], 0
        pending.append(spec)
        pending_bytes += spec.nbytes
    return [*shards, pending] if pending else shards


def check_output_location(out: Path, inputs: Iterable[Path], *, overwrite: bool) -> Path:
    """Refuse outputs that would clobber an input or an existing folder, or that cannot be
    written (a read-only disk, a file in the way); return it resolved. Runs before compute."""
    out = out.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise OutputError(
                f"output {out} overlaps input model {src}",
                "inputs are never modified: choose an output folder outside every input",
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise OutputError(f"output folder {out} already exists", "pass --overwrite to replace it")
    check_output_folder(out)
    return out


class InPlaceShards:
    """Shards whose layout is known before the first tensor arrives: each tensor is written at
    its final offset, on a background thread, as soon as it is added.

    The headers follow from the names, shapes and dtypes alone, so nothing waits for a shard
    to fill: writing overlaps whatever the caller does next, and a tensor's memory is freed
    once its bytes are on disk instead of when its shard is complete. The files are byte for
    byte those :func:`save_file` writes for the same shards. At most ``shard_size`` bytes of
    added tensors wait for the writer thread (the memory a collected shard would take);
    :meth:`add` blocks beyond that. A failed write raises (as an :class:`OutputError`) from a
    later :meth:`add` or from :meth:`finish`.
    """

    def __init__(self, folder: Path, out: Path, specs: Sequence[TensorSpec], shard_size: int):
        self.folder, self.out, self.shard_size = folder, out, shard_size
        self._specs = list(specs)
        self._shards = split_into_shards(self._specs, shard_size)
        self._places: list[tuple[int, int]] = []  # per spec: shard index, byte offset
        self._headers: list[bytes] = []
        for index, shard in enumerate(self._shards):
            header = header_bytes(shard, {"format": "pt"})
            self._headers.append(header)
            offset = len(header)
            for spec in shard:
                self._places.append((index, offset))
                offset += spec.nbytes
        self._added = 0
        self._files: dict[int, int] = {}  # shard index -> open file (touched by the thread only)
        self._queue: deque[tuple[Future[None], int]] = deque()
        self._queued_bytes = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dammerge-write")

    @staticmethod
    def supports(specs: Iterable[TensorSpec]) -> bool:
        """Whether every dtype has a safetensors code this writer knows."""
        return all(spec.dtype in _SAFETENSORS_DTYPES for spec in specs)

    def filename(self, index: int) -> str:
        return f"shard-{index:05d}.tmp"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (CPU, contiguous), the next one of the layout, for writing."""
        if self._added == len(self._specs):
            raise ValueError(f"tensor {name!r} was not in the writer's layout")
        spec = self._specs[self._added]
        given = TensorSpec(name, tuple(tensor.shape), tensor.dtype)
        if given != spec:
            raise ValueError(f"the writer expected {spec} next, was given {given}")
        shard, offset = self._places[self._added]
        self._added += 1
        self._wait_until(self.shard_size - spec.nbytes)
        future = self._thread.submit(self._write, shard, offset, tensor)
        self._queue.append((future, spec.nbytes))
        self._queued_bytes += spec.nbytes

    def _write(self, shard: int, offset: int, tensor: torch.Tensor) -> None:
        """On the writer thread: create the shard with its header if new, write the data."""
        fd = self._files.get(shard)
        if fd is None:
            path = self.folder / self.filename(shard)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self._files[shard] = fd
            write_at(fd, memoryview(self._headers[shard]), 0)
        if tensor.numel():
            write_at(fd, tensor_bytes(tensor), offset)

    def _wait_until(self, queued_bytes: int) -> None:
        """Collect finished writes (raising the first failure), then wait for the oldest until
        at most ``queued_bytes`` are still queued."""
        while self._queue and (self._queue[0][0].done() or self._queued_bytes > queued_bytes):
            future, size = self._queue.popleft()
            self._queued_bytes -= size
            try:
                future.result()
            except OSError as exc:
                raise output_error(exc, self.out) from None

    def finish(self) -> list[tuple[str, list[str]]]:
        """Wait for every write and close the files; returns (file name, tensor names) per
        shard in order."""
        if self._added < len(self._specs):
            missing = self._specs[self._added].name
            raise ValueError(f"{len(self._specs) - self._added} tensors never added ({missing}, …)")
        self._wait_until(0)
        self._thread.shutdown(wait=True)
        try:
            for fd in self._files.values():
                os.close(fd)
        except OSError as exc:
            raise output_error(exc, self.out) from None
        finally:
            self._files.clear()
        shards = enumerate(self._shards)
        return [(self.filename(i), [spec.name for spec in shard]) for i, shard in shards]

    def abandon(self) -> None:
        """Drop the writes not yet started, wait for the one running, close the files (after
        an error or an interrupt: the folder is about to be deleted)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()
        self._queue.clear()


class CheckpointWriter:
    """Collects tensors into safetensors shards inside a temporary folder.

    Use as a context manager: on a clean exit :meth:`commit` must have been called (it renames
    the folder into place); on any exception the temporary folder is deleted. The folder
    itself is a :class:`~dammerge.outputs.StagedFolder`, the one every command's output uses.

    Given the ``layout`` (every tensor's name, shape and dtype, in the order they will be
    added), tensors are written in place on a background thread as they come
    (:class:`InPlaceShards`); without it (or with a dtype only safetensors' own writer knows),
    they are collected and each shard is written once ``shard_size`` bytes are pending. The
    files are the same either way.
    """

    def __init__(
        self,
        out: Path,
        *,
        shard_size: int = 5 * 2**30,
        overwrite: bool = False,
        layout: Sequence[TensorSpec] | None = None,
    ):
        self.out = Path(out).resolve()
        self.shard_size = shard_size
        self.overwrite = overwrite
        self._staged = StagedFolder(self.out, replace=overwrite)
        self.tmp = self._staged.tmp
        self._layout = layout
        self._in_place: InPlaceShards | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self._staged.__enter__()
        if self._layout is not None and InPlaceShards.supports(self._layout):
            self._in_place = InPlaceShards(self.tmp, self.out, self._layout, self.shard_size)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._in_place is not None:
                self._in_place.abandon()  # a no-op after commit; else before the folder goes
        finally:
            self._staged.__exit__(exc_type, exc, tb)

    # -- tensors --------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; it is written in place at once when the layout is known, else
        with its shard once ``shard_size`` bytes are pending."""
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._in_place is not None:
            self._in_place.add(name, tensor)
            self._total_bytes += size
            return
        if self._pending and self._pending_bytes + size > self.shard_size:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        filename = f"shard-{len(self._shards):05d}.tmp"
        try:
            save_file(self._pending, str(self.tmp / filename), metadata={"format": "pt"})
        except OSError as exc:
            raise output_error(exc, self.out) from None
        except SafetensorError as exc:  # the Rust writer reports I/O failures (disk full) here
            raise _safetensors_error(exc, self.out) from None
        self._shards.append((filename, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def _finish_shards(self) -> None:
        if self._in_place is not None:
            self._shards = self._in_place.finish()
        self._flush()
        total = len(self._shards)
        if total == 1:
            os.replace(self.tmp / self._shards[0][0], self.tmp / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for i, (filename, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.tmp / filename, self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        self.write_json("model.safetensors.index.json", index)

    # -- side files -----------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text)
        except OSError as exc:
            raise output_error(exc, self.out) from None

    def copy_file(self, src: Path, name: str | None = None) -> None:
        try:
            shutil.copyfile(src, self.tmp / (name or src.name))
        except OSError as exc:
            raise output_error(exc, self.out) from None

    def write_config(self, config: dict[str, Any], dtype: torch.dtype) -> None:
        """Write ``config.json`` with its dtype updated to the written tensors' dtype."""
        config = dict(config)
        dtype_name = str(dtype).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        self.write_json("config.json", config)

    def copy_tokenizer(self, source: Path) -> list[str]:
        """Copy the tokenizer files that exist in ``source``; returns their names."""
        copied = []
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                self.copy_file(source / name)
                copied.append(name)
        return copied

    def save_tokenizer(self, tokenizer: Any) -> None:
        """Write a transformers tokenizer's files (one the merge changed)."""
        try:
            tokenizer.save_pretrained(str(self.tmp))
        except OSError as exc:
            raise output_error(exc, self.out) from None

    # -- finish ---------------------------------------------------------------------------
    def commit(self) -> Path:
        """Finish shards and move the folder into place atomically."""
        self._finish_shards()
        return self._staged.commit()


def _safetensors_error(exc: SafetensorError, out: Path) -> OutputError:
    """safetensors raises its own error type for I/O failures; recover the errno it names."""
    text = str(exc)
    match = re.search(r"os error (\d+)", text)
    if match:
        code = int(match.group(1))
        return output_error(OSError(code, os.strerror(code)), out)
    return OutputError(f"cannot write {out}: {text}")

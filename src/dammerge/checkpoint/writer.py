"""Atomic, sharded writing of a merged checkpoint.

Everything goes into a temporary sibling folder (``.NAME.dammerge-tmp-PID``) and is renamed into
place only when the last byte is on disk, so a failed, interrupted or killed merge never leaves
a half-written model where the user expects a complete one. Stale temporary folders of dead
processes are cleaned up on the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
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
__all__ = ["TMP_MARKER", "CheckpointWriter", "check_output_location", "clean_stale_temporaries"]


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
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(filename, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


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


class CheckpointWriter:
    """Collects tensors into safetensors shards inside a temporary folder.

    Use as a context manager: on a clean exit :meth:`commit` must have been called (it renames
    the folder into place); on any exception the temporary folder is deleted. The folder
    itself is a :class:`~dammerge.outputs.StagedFolder`, the one every command's output uses.
    """

    def __init__(self, out: Path, *, shard_size: int = 5 * 2**30, overwrite: bool = False):
        self.out = Path(out).resolve()
        self.shard_size = shard_size
        self.overwrite = overwrite
        self._staged = StagedFolder(self.out, replace=overwrite)
        self.tmp = self._staged.tmp
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self._staged.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._staged.__exit__(exc_type, exc, tb)

    # -- tensors --------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes a shard once ``shard_size`` bytes are pending."""
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
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

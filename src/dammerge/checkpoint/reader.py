"""Lazy, validated reading of local Hugging Face checkpoints.

A :class:`Checkpoint` opens a model folder, checks it (index entries stay inside the folder,
shards are complete, pickles are refused unless allowed) and then hands out one tensor at a
time from memory-mapped safetensors files, so merging a 70B model never loads it whole.
Nothing here ever writes to the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dammerge.checkpoint.architecture import Architecture, TensorInfo
from dammerge.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


class Checkpoint:
    """A local HF model folder whose tensors are read lazily, one at a time."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"model folder not found: {path}",
                "dammerge reads local folders only and never downloads; pass a directory path",
            )
        self.path = self.path.resolve()
        self.allow_pickle = allow_pickle
        self.config = self._read_config()
        self.architecture = Architecture.from_config(self.config)
        self._weight_map = self._read_weight_map()
        self._handles: dict[Path, Any] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range in its shard
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._open_all()

    # -- discovery ------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.path} has no config.json",
                "point at a Hugging Face model folder (config.json + *.safetensors)",
            )
        try:
            return json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None

    def _read_weight_map(self) -> dict[str, Path]:
        for index_name, single_name, pickled in (
            (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, False),
            (PICKLE_INDEX, PICKLE_SINGLE, True),
        ):
            index_path, single_path = self.path / index_name, self.path / single_name
            if not (index_path.exists() or single_path.exists()):
                continue
            if pickled and not self.allow_pickle:
                raise CheckpointError(
                    f"{self.path} holds only pickle weights ({single_name}); pickles can run "
                    "arbitrary code when loaded",
                    "convert it to safetensors, or pass --allow-pickle to load it with "
                    "torch.load(weights_only=True)",
                )
            if index_path.exists():
                return self._weight_map_from_index(index_path)
            return {"": single_path}
        raise CheckpointError(
            f"no weights found in {self.path}",
            f"expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (or a pickle with "
            "--allow-pickle)",
        )

    def _weight_map_from_index(self, index_path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{index_path} is not a valid shard index (needs a 'weight_map' object)"
            ) from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index_path} is not a valid shard index ('weight_map' is not an object)"
            )
        resolved: dict[str, Path] = {}
        for name, filename in weight_map.items():
            shard = self.path / str(filename)
            # Judge the name as written, not where symlinks lead: Hugging Face cache snapshots
            # are folders of symlinks into ../../blobs, and those are legitimate.
            if not _stays_inside(str(filename), self.path):
                raise CheckpointError(
                    f"{index_path.name} maps {name!r} to {filename!r}, outside the model folder",
                    "a shard index may only name files inside its own folder; the file is "
                    "corrupt or hostile",
                )
            if not shard.is_file():
                raise CheckpointError(
                    f"{index_path.name} names shard {filename!r}, which does not exist",
                    "the download is incomplete; fetch the missing shard",
                )
            resolved[name] = shard
        return resolved

    def _open_all(self) -> None:
        for shard in sorted(set(self._weight_map.values())):
            if shard.suffix == ".safetensors":
                self._open_safetensors(shard)
            else:
                self._open_pickle(shard)
        if "" in self._weight_map:  # single file: names come from the file itself
            shard = self._weight_map.pop("")
            names = (
                self._handles[shard].keys()
                if shard in self._handles
                else self._pickles[shard].keys()
            )
            self._weight_map = dict.fromkeys(names, shard)
        else:
            self._check_index_complete()

    def _open_safetensors(self, shard: Path) -> None:
        try:
            handle = safe_open(str(shard), framework="pt", device="cpu")
            for name in handle.keys():  # noqa: SIM118 (not iterable)
                sl = handle.get_slice(name)
                self._meta[name] = (tuple(sl.get_shape()), _dtype(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {shard}: truncated or corrupt ({str(exc).splitlines()[0]})",
                "download or copy that file again",
            ) from None
        self._handles[shard] = handle
        self._offsets.update(_data_offsets(shard))

    def _open_pickle(self, shard: Path) -> None:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise CheckpointError(
                f"cannot load pickle {shard}: {str(exc).splitlines()[0]}",
                "even with --allow-pickle only plain tensors are accepted (weights_only=True)",
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint wrapping the weights
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(
                f"{shard} is not a plain state dict of named tensors",
                "save the model with save_pretrained (safetensors) and merge that folder",
            )
        self._pickles[shard] = state
        for name, tensor in state.items():
            self._meta[name] = (tuple(tensor.shape), tensor.dtype)

    def _check_index_complete(self) -> None:
        for name, shard in self._weight_map.items():
            if name not in self._meta:
                raise CheckpointError(
                    f"the shard index of {self.path} says {name!r} is in {shard.name}, but it "
                    "is not there",
                    "the index and the shards disagree; the checkpoint is corrupt",
                )

    # -- access ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def folder(self) -> Path:
        """The folder holding the model's config.json, tokenizer and generation config (its
        ``path``; a LoRA reference's base folder)."""
        return self.path

    def source_folders(self) -> list[Path]:
        """Every folder this checkpoint reads (an output must not overlap any)."""
        return [self.path]

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def info(self, name: str) -> TensorInfo:
        return self.architecture.classify(name, len(self.shape(name)))

    def nbytes(self, name: str) -> int:
        shape, dtype = self._meta[name]
        count = 1
        for size in shape:
            count *= size
        return count * dtype.itemsize

    def get(self, name: str, *, pinned: bool = False) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor, read from the file).

        ``pinned`` reads it into page-locked memory (CUDA only), which a GPU copies from by DMA
        at full bus speed, instead of through the driver's staging buffers.
        """
        shard = self._weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        if shard in self._handles:
            try:
                return _pread_tensor(shard, self._offsets[name], *self._meta[name], pinned)
            except OSError as exc:
                raise CheckpointError(f"cannot read {name!r} from {shard}: {exc}") from None
        return self._pickles[shard][name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (along its first dimension), reading only their
        bytes: a rank of a sharded learned merge fills its slice of a store with this."""
        shard = self._weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        shape, dtype = self._meta[name]
        start, stop = max(0, start), min(shape[0], stop)
        if shard not in self._handles:
            return self._pickles[shard][name][start:stop].clone()
        row_bytes = dtype.itemsize
        for size in shape[1:]:
            row_bytes *= size
        first = self._offsets[name][0]
        span = (first + start * row_bytes, first + max(start, stop) * row_bytes)
        try:
            return _pread_tensor(shard, span, (max(0, stop - start), *shape[1:]), dtype)
        except OSError as exc:
            raise CheckpointError(f"cannot read {name!r} from {shard}: {exc}") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names())

    def files(self) -> list[Path]:
        return sorted(set(self._weight_map.values()))


def _stays_inside(filename: str, folder: Path) -> bool:
    """True if ``filename`` (from a shard index) names a file inside ``folder`` lexically:
    relative, and no ``..`` climbing out of it."""
    if not filename or os.path.isabs(filename) or "\\" in filename:
        return False
    joined = os.path.normpath(os.path.join(folder, filename))
    return os.path.commonpath([joined, str(folder)]) == str(folder) and joined != str(folder)


def _data_offsets(shard: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor of a safetensors file (its header was already
    validated by ``safe_open``)."""
    with open(shard, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    start = 8 + header_len
    return {
        name: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _pread_tensor(
    shard: Path,
    span: tuple[int, int],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    pinned: bool = False,
) -> torch.Tensor:
    """Read one tensor with ``pread`` into a fresh tensor.

    Not through the mmap: pages of a memory-mapped file stay in the process's resident set
    while the file is open, so a merge that touched every input tensor would end up "using"
    the size of all its inputs; pread copies from the page cache and keeps RSS to the tensors
    alive. Reads loop because one read returns at most ~2 GiB.
    """
    out = torch.empty(shape, dtype=dtype, pin_memory=pinned)
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    if len(buffer) != span[1] - span[0]:
        raise OSError(f"header says {span[1] - span[0]} bytes, shape needs {len(buffer)}")
    fd = os.open(shard, os.O_RDONLY)
    try:
        done = 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], span[0] + done)
            if n <= 0:
                raise OSError("file ends early: truncated")
            done += n
    finally:
        os.close(fd)
    return out


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype(code: str) -> torch.dtype:
    try:
        return _DTYPES[code]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {code}") from None

"""Shared fixtures: tiny random-init checkpoints built with transformers, never downloaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

from dammerge.testing import make_family

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and three perturbed 'fine-tunes' (read-only: do not modify)."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama", n=3)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Callable[[str], tuple[Path, list[Path]]]:
    """``tiny_family(arch)``: a tiny base of ``arch`` and two 'fine-tunes', built once per
    session and shared (read-only: do not modify)."""
    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(arch: str) -> tuple[Path, list[Path]]:
        if arch not in cache:
            cache[arch] = make_family(tmp_path_factory.mktemp(f"family-{arch}"), arch, n=2)
        return cache[arch]

    return get


def derive_checkpoint(
    src: Path, dst: Path, edit: Callable[[dict], dict] | None = None, *, shard_files: int = 1
) -> Path:
    """Copy model folder ``src`` to ``dst`` with its tensors passed through ``edit`` (a function
    from state dict to state dict); ``shard_files > 1`` writes a sharded checkpoint + index."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    state = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update(load_file(file))
    for file in src.iterdir():
        if file.suffix != ".safetensors" and not file.name.endswith(".index.json"):
            shutil.copyfile(file, dst / file.name)
    if edit is not None:
        state = edit(state)
    names = sorted(state)
    if shard_files <= 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i in range(shard_files):
        part = names[i::shard_files]
        filename = f"model-{i + 1:05d}-of-{shard_files:05d}.safetensors"
        save_file({n: state[n] for n in part}, dst / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture
def derive() -> Callable[..., Path]:
    """The :func:`derive_checkpoint` helper, as a fixture (tests import nothing from conftest)."""
    return derive_checkpoint


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``micro`` family (seed 0, far regime), built once per session (read-only)."""
    from dammerge.family.build import build_family

    root = tmp_path_factory.mktemp("family") / "micro"
    return build_family(root, "micro", 0, regime="far").root


@pytest.fixture(params=["read-only folder", "read-only file system", "folder under a file"])
def unwritable_folder(request: pytest.FixtureRequest, tmp_path: Path):
    """A folder in which nothing can be created: a read-only folder (``chmod 555``; skipped as
    root, whom permissions do not stop), an empty read-only tmpfs (needs the right to mount;
    stops root too), or a path whose parent is a file (fails for anyone)."""
    if request.param == "folder under a file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        yield blocker / "folder"
    elif request.param == "read-only file system":
        yield from _read_only_mount(tmp_path / "read-only-fs")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions (the other cases cover root)")
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def _read_only_mount(folder: Path):
    import subprocess

    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, check=False)

"""Reading checkpoints: single and sharded safetensors, lazily; hostile, broken and pickled
inputs refused with one clear line; inputs never modified."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dammerge
from dammerge.checkpoint.reader import Checkpoint
from dammerge.errors import CheckpointError


def reference_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(file))
    return state


def assert_reads_like(ck: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(ck.names()) == sorted(state)
    for name, tensor in state.items():
        assert ck.shape(name) == tuple(tensor.shape)
        assert ck.dtype(name) == tensor.dtype
        assert ck.nbytes(name) == tensor.numel() * tensor.element_size()
        torch.testing.assert_close(ck.get(name), tensor, rtol=0, atol=0)


def test_single_file(llama_family):
    base, _ = llama_family
    ck = Checkpoint(base)
    assert ck.config["model_type"] == "llama"
    assert ck.files() == [base.resolve() / "model.safetensors"]
    assert_reads_like(ck, reference_state(base))
    assert ck.total_bytes() == sum(t.numel() * 4 for t in reference_state(base).values())


def test_sharded_with_index(llama_family, tmp_path, derive):
    base, _ = llama_family
    sharded = derive(base, tmp_path / "sharded", shard_files=3)
    ck = Checkpoint(sharded)
    assert len(ck.files()) == 3
    assert_reads_like(ck, reference_state(base))
    assert dict(ck.iter_tensors()).keys() == reference_state(base).keys()


def test_bf16_and_int_tensors(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    state = {"a.weight": torch.randn(3, 4).to(torch.bfloat16), "ids": torch.arange(5)}
    save_file(state, folder / "model.safetensors")
    assert_reads_like(Checkpoint(folder), state)


def test_rows_of_a_tensor_read_alone(llama_family, tmp_path, derive):
    base, _ = llama_family
    sharded = derive(base, tmp_path / "sharded", shard_files=3)
    for ck in (Checkpoint(base), Checkpoint(sharded)):
        for name, tensor in reference_state(base).items():
            rows = tensor.shape[0]
            for first, last in [(0, rows), (1, rows // 2 + 1), (rows - 1, rows + 5), (rows, rows)]:
                expected = tensor[first:last]
                torch.testing.assert_close(ck.get_rows(name, first, last), expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no tensor"):
        Checkpoint(base).get_rows("missing", 0, 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_reading_is_lazy_one_tensor_at_a_time(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB
    save_file({"big.weight": big, "small.weight": torch.ones(10)}, folder / "model.safetensors")
    del big
    before = _rss_bytes()
    ck = Checkpoint(folder)
    small = ck.get("small.weight")
    opened = _rss_bytes() - before
    assert small.sum() == 10
    assert opened < 16 * 2**20, f"opening + one small tensor took {opened / 2**20:.0f} MiB"


def _index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.mark.parametrize(
    "target", ["../outside.safetensors", "ABSOLUTE", "sub/../../x.safetensors"]
)
def test_index_entries_outside_the_folder_are_refused(llama_family, tmp_path, derive, target):
    base, _ = llama_family
    sharded = derive(base, tmp_path / "m", shard_files=2)
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(next(sharded.glob("model-00001*.safetensors")), outside)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = str(outside) if target == "ABSOLUTE" else target
    _index(sharded, index["weight_map"])
    with pytest.raises(CheckpointError, match="outside the model folder") as info:
        Checkpoint(sharded)
    assert info.value.hint


def test_symlinked_shards_inside_the_folder_are_accepted(llama_family, tmp_path, derive):
    """A Hugging Face cache snapshot: files are symlinks into ../../blobs."""
    base, _ = llama_family
    sharded = derive(base, tmp_path / "blobs-src", shard_files=2)
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(sharded.iterdir())):
        blob = blobs / f"blob{i}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    assert_reads_like(Checkpoint(snapshot), reference_state(base))


def test_missing_shard(llama_family, tmp_path, derive):
    base, _ = llama_family
    sharded = derive(base, tmp_path / "m", shard_files=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(sharded)


def test_index_naming_a_tensor_its_shard_lacks(llama_family, tmp_path, derive):
    base, _ = llama_family
    sharded = derive(base, tmp_path / "m", shard_files=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors"
    _index(sharded, index["weight_map"])
    with pytest.raises(CheckpointError, match=r"ghost\.weight"):
        Checkpoint(sharded)


@pytest.mark.parametrize("keep", [0.5, 0.999, 6])
def test_truncated_shard(llama_family, tmp_path, derive, keep):
    base, _ = llama_family
    folder = derive(base, tmp_path / "m")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        Checkpoint(folder)
    assert "\n" not in info.value.message


@pytest.mark.parametrize("text", ["{not json", '{"weight_map": 3}', '{"metadata": {}}', "[]"])
def test_broken_index(llama_family, tmp_path, derive, text):
    base, _ = llama_family
    sharded = derive(base, tmp_path / "m", shard_files=2)
    (sharded / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        Checkpoint(sharded)


def test_folder_problems(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(tmp_path)


def _pickled(base: Path, folder: Path, shards: int = 1) -> Path:
    folder.mkdir()
    shutil.copyfile(base / "config.json", folder / "config.json")
    state = reference_state(base)
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        filename = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in names[i::shards]}, folder / filename)
        weight_map.update(dict.fromkeys(names[i::shards], filename))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shards", [1, 2])
def test_pickles_refused_without_opt_in_and_loaded_with_it(llama_family, tmp_path, shards):
    base, _ = llama_family
    folder = _pickled(base, tmp_path / "pickled", shards)
    with pytest.raises(CheckpointError, match="pickle") as info:
        Checkpoint(folder)
    assert "--allow-pickle" in info.value.hint
    assert_reads_like(Checkpoint(folder, allow_pickle=True), reference_state(base))


class Payload:
    """Anything but a tensor: weights_only loading must refuse to build it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickles_with_code_are_refused_even_when_allowed(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.ones(2), "x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load pickle"):
        Checkpoint(folder, allow_pickle=True)
    torch.save({"w": torch.ones(2), "step": 3}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="plain state dict"):
        Checkpoint(folder, allow_pickle=True)


def _fingerprint(folders: list[Path]) -> dict[str, tuple[str, int, int]]:
    prints = {}
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                stat = file.stat()
                digest = hashlib.sha256(file.read_bytes()).hexdigest()
                prints[str(file)] = (digest, stat.st_mtime_ns, stat.st_mode)
        prints[str(folder)] = ("dir", folder.stat().st_mtime_ns, folder.stat().st_mode)
    return prints


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_inputs_unchanged_after_a_merge(llama_family, tmp_path, method):
    base, variants = llama_family
    before = _fingerprint([base, *variants])
    dammerge.merge(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [
                {"model": str(v), "parameters": {"weight": 0.5, "density": 0.5}} for v in variants
            ],
            "out_dtype": "bfloat16",
        },
        tmp_path / "merged",
        progress=False,
        shard_size=10_000,
    )
    assert _fingerprint([base, *variants]) == before

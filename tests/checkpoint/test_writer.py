"""Writing merged checkpoints: sharded safetensors + index that transformers loads, side files,
and atomicity: failures, a full disk or a kill leave nothing half-written, inputs are refused
as outputs, and stale temporary folders are cleaned up."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dammerge
from dammerge.checkpoint import writer as writer_module
from dammerge.checkpoint.writer import TMP_MARKER, CheckpointWriter, TensorSpec
from dammerge.errors import OutputError

from ..cli_helpers import run_cli

merge_module = importlib.import_module("dammerge.executor")


def recipe(family, method="task_arithmetic", **extra):
    base, variants = family
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(v), "parameters": {"weight": 0.5}} for v in variants],
        **extra,
    }


def leftovers(out: Path) -> list[str]:
    """The output and every temporary sibling of it that exists."""
    found = [p.name for p in out.parent.glob(f".{out.name}{TMP_MARKER}*")]
    return [*found, out.name] if out.exists() else found


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(file))
    return state


def test_sharding_by_size_gives_a_valid_index_that_transformers_loads(llama_family, tmp_path):
    shard_size = 20_000
    whole = dammerge.merge(recipe(llama_family), tmp_path / "whole", progress=False)
    out = dammerge.merge(
        recipe(llama_family), tmp_path / "sharded", progress=False, shard_size=shard_size
    )
    assert (whole / "model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for shard in shards:
        state = load_file(shard)
        sizes = [t.numel() * t.element_size() for t in state.values()]
        assert sum(sizes) <= shard_size or len(sizes) == 1  # one tensor may exceed on its own
        assert all(index["weight_map"][name] == shard.name for name in state)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    reference = tensors_of(whole)
    assert set(index["weight_map"]) == set(reference)
    for name, tensor in tensors_of(out).items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    torch.testing.assert_close(
        params["model.layers.2.mlp.up_proj.weight"], reference["model.layers.2.mlp.up_proj.weight"]
    )


def test_out_dtype_updates_config_and_tensors(llama_family, tmp_path):
    out = dammerge.merge(recipe(llama_family, out_dtype="bfloat16"), tmp_path / "m", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert {t.dtype for t in tensors_of(out).values()} == {torch.bfloat16}
    base_config = json.loads((llama_family[0] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dtype"} == {
        k: v for k, v in base_config.items() if k != "dtype"
    }
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_write_config_updates_legacy_torch_dtype(tmp_path):
    with CheckpointWriter(tmp_path / "o") as writer:
        writer.add("w", torch.zeros(2, dtype=torch.float16))
        writer.write_config({"model_type": "llama", "torch_dtype": "float32"}, torch.float16)
        out = writer.commit()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"


def test_side_files_tokenizer_recipe_and_card(llama_family, tmp_path):
    base, variants = llama_family
    source = tmp_path / "tok"
    source.mkdir()
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 4321
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (source / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    cfg = recipe(llama_family, tokenizer_source=str(source))
    out = dammerge.merge(cfg, tmp_path / "m", progress=False, seed=7)
    assert (out / "generation_config.json").read_text() == (
        base / "generation_config.json"
    ).read_text()
    assert AutoTokenizer.from_pretrained(out).model_max_length == 4321
    written = yaml.safe_load((out / "dammerge_config.yml").read_text())
    assert written["merge_method"] == "task_arithmetic"
    # saved paths resolve from the recipe's own folder (the checkpoint)
    assert (out / written["tokenizer_source"]).resolve() == source.resolve()
    assert (out / written["models"][0]["model"]).resolve() == variants[0].resolve()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "Seed: 7" in card and f"`{variants[0].name}`" in card


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_write_leaves_nothing(llama_family, tmp_path, monkeypatch, error):
    slow_writes(monkeypatch)
    calls = {"n": 0}
    original = merge_module.merge_tensor

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:  # after several shards are on disk in the temporary folder
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merge_tensor", failing)
    out = tmp_path / "deep" / "er" / "merged"
    with pytest.raises(type(error)):
        dammerge.merge(recipe(llama_family), out, progress=False, shard_size=10_000)
    assert calls["n"] == 15
    assert not (tmp_path / "deep").exists()  # not even the parents it created
    assert list(tmp_path.iterdir()) == []
    assert merge_threads() == []  # the reading and writing threads ended with it


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    ],
)
def test_disk_full_is_an_output_error_with_no_leftovers(
    llama_family, tmp_path, monkeypatch, raised
):
    """Collected shards (no layout given): the third shard's write fails."""
    written = {"n": 0}
    original = writer_module.save_file

    def filling(*args, **kwargs):
        written["n"] += 1
        if written["n"] == 3:
            raise raised
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_module, "save_file", filling)
    out = tmp_path / "merged"
    with pytest.raises(OutputError, match="disk full") as info:
        write_collected(out, tensors_of(llama_family[0]), shard_size=10_000)
    assert info.value.hint
    assert leftovers(out) == []


def write_collected(out: Path, tensors: dict[str, torch.Tensor], shard_size: int) -> Path:
    """``tensors`` written by a writer without a layout: collected into shards."""
    with CheckpointWriter(out, shard_size=shard_size) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.commit()


def write_in_place(out: Path, tensors: dict[str, torch.Tensor], shard_size: int) -> Path:
    """The same with the layout given: each tensor written in place by the writer thread."""
    layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with CheckpointWriter(out, shard_size=shard_size, layout=layout) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.commit()


def file_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """An independent reader of the format: 8-byte header length, JSON header, then each
    tensor's bytes at its offsets (checks the data start and the file end too)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert (8 + length) % 8 == 0
    codes = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "BOOL": torch.bool}
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    assert len(raw) == 8 + length + end
    state = {}
    for name, entry in header.items():
        start, stop = (8 + length + offset for offset in entry["data_offsets"])
        flat = torch.tensor(list(raw[start:stop]), dtype=torch.uint8)
        state[name] = flat.view(codes[entry["dtype"]]).reshape(entry["shape"])
    return state


def odd_tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes, empty tensors (first, in the middle, last) and one larger than a shard."""
    generator = torch.Generator().manual_seed(0)
    return {
        "empty.first": torch.zeros(0, 3),
        "a": torch.randn(7, 5, generator=generator),
        "big": torch.randn(40, 64, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(11),
        "mask": torch.rand(13, generator=generator) > 0.5,
        "empty.middle": torch.zeros(4, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "b": torch.randn(3, 3, 3, generator=generator),
        "empty.last": torch.zeros(0),
    }


@pytest.mark.parametrize("shard_size", [1, 200, 1_000, 6_000, 10**9])
def test_in_place_shards_are_the_bytes_of_collected_shards(tmp_path, shard_size):
    tensors = odd_tensors()
    collected = write_collected(tmp_path / "collected", tensors, shard_size)
    in_place = write_in_place(tmp_path / "in_place", tensors, shard_size)
    assert file_hashes(in_place) == file_hashes(collected)
    read = {}
    for shard in in_place.glob("*.safetensors"):
        read.update(read_safetensors(shard))
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor), name
    if shard_size == 1:  # every tensor alone in its shard
        assert len(list(in_place.glob("*.safetensors"))) == len(tensors)


def test_in_place_writer_refuses_a_tensor_out_of_its_layout(tmp_path):
    tensors = odd_tensors()
    layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="expected"), CheckpointWriter(out, layout=layout) as w:
        w.add("a", tensors["a"])  # "empty.first" comes first
    with pytest.raises(ValueError, match="never added"), CheckpointWriter(out, layout=layout) as w:
        w.add("empty.first", tensors["empty.first"])
        w.commit()
    assert leftovers(out) == []


def test_the_writer_thread_keeps_at_most_one_shard_of_results_waiting(tmp_path, monkeypatch):
    """While the disk is stuck, :meth:`add` returns only while the tensors not yet written fit
    in ``shard_size`` bytes: two 400-byte tensors in 1,000 bytes, the third waits."""
    gate = threading.Event()
    original = writer_module.write_at

    def stuck(*args, **kwargs):
        gate.wait(timeout=60)
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_at", stuck)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(6)}
    added: list[str] = []

    def produce() -> None:
        layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        with CheckpointWriter(tmp_path / "o", shard_size=1_000, layout=layout) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
                added.append(name)
            writer.commit()

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 30
    while len(added) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert added == ["t0", "t1"]
    gate.set()
    producer.join(timeout=60)
    assert added == list(tensors)
    assert file_hashes(tmp_path / "o") == file_hashes(
        write_collected(tmp_path / "c", tensors, 1_000)
    )


@pytest.mark.parametrize("shard_size", [10_000, None])
def test_merges_write_the_same_files_with_and_without_the_writer_thread(
    llama_family, tmp_path, monkeypatch, shard_size
):
    sizes = {} if shard_size is None else {"shard_size": shard_size}
    cfg = recipe(llama_family, method="ties", parameters={"density": 0.5})
    threaded = dammerge.merge(cfg, tmp_path / "threaded", progress=False, **sizes)
    assert threaded is not None
    monkeypatch.setattr(merge_module, "output_layout", lambda plan: None)
    collected = dammerge.merge(cfg, tmp_path / "collected", progress=False, **sizes)
    assert collected is not None
    hashes = file_hashes(threaded)
    assert hashes == file_hashes(collected)
    shards = [name for name in hashes if name.endswith(".safetensors")]
    if shard_size is None:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 3


def merge_threads() -> list[threading.Thread]:
    """The executor's reading and writing threads still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("dammerge-")]


def test_a_failed_background_write_is_one_line_exit_2_and_leaves_nothing(
    llama_family, tmp_path, monkeypatch, capfd
):
    calls = {"n": 0}
    original = writer_module.write_at

    def filling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # a few shards are already (partly) on disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_at", filling)
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(yaml.safe_dump(recipe(llama_family)))
    out = tmp_path / "merged"
    code = run_cli(monkeypatch, "merge", recipe_file, out, "--shard-size", "10000")
    err = capfd.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: disk full while writing {out}"
    ]
    assert "Traceback" not in err
    assert calls["n"] == 20
    assert leftovers(out) == []
    assert merge_threads() == []


def slow_writes(monkeypatch) -> None:
    """Each background write takes a moment, so writes are still queued when the loop ends."""
    original = writer_module.write_at

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_at", slow)


def test_real_full_disk(llama_family, tmp_path):
    """On a 64 KiB tmpfs (needs root; skipped otherwise): the real error path of safetensors."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(OutputError, match="disk full"):
            dammerge.merge(
                recipe(llama_family), mount / "merged", progress=False, shard_size=30_000
            )
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_overlapping_an_input_is_refused(llama_family, where):
    base, variants = llama_family
    out = {"inside": variants[1] / "merged", "same": base, "parent": base.parent}[where]
    before = sorted(p.name for p in base.parent.rglob("*"))
    with pytest.raises(OutputError, match="overlaps input model"):
        dammerge.merge(recipe(llama_family), out, progress=False, overwrite=True)
    assert sorted(p.name for p in base.parent.rglob("*")) == before


def test_overwrite_semantics(llama_family, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old-marker.txt").write_text("keep me unless overwritten")
    with pytest.raises(OutputError, match="already exists") as info:
        dammerge.merge(recipe(llama_family), out, progress=False)
    assert "--overwrite" in info.value.hint
    assert (out / "old-marker.txt").is_file()
    dammerge.merge(recipe(llama_family), out, progress=False, overwrite=True)
    assert not (out / "old-marker.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert leftovers(out) == ["merged"]


def test_an_existing_file_is_not_replaced_by_a_folder(llama_family, tmp_path):
    out = tmp_path / "merged"
    out.write_text("a file")
    with pytest.raises(OutputError, match="not a folder"):
        dammerge.merge(recipe(llama_family), out, progress=False, overwrite=True)
    assert out.read_text() == "a file"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_cleaned(llama_family, tmp_path):
    out = tmp_path / "merged"
    dead = _dead_pid()
    stale = [tmp_path / f".merged{TMP_MARKER}{dead}", tmp_path / f".merged{TMP_MARKER}{dead}-old"]
    alive = tmp_path / f".merged{TMP_MARKER}{os.getppid()}"  # a live process: not ours to touch
    other = tmp_path / f".other{TMP_MARKER}{dead}"  # another output's: not ours either
    for folder in [*stale, alive, other]:
        folder.mkdir()
        (folder / "shard-00000.tmp").write_bytes(b"x" * 10)
    dammerge.merge(recipe(llama_family), out, progress=False)
    assert not any(s.exists() for s in stale)
    assert alive.exists() and other.exists()


SLOW_MERGE = """
import sys, time
from dammerge.checkpoint import writer

original = writer.CheckpointWriter.add

def slow_add(self, name, tensor):
    original(self, name, tensor)
    print("added", name, flush=True)
    time.sleep(0.3)

writer.CheckpointWriter.add = slow_add
sys.argv = ["dammerge", "merge", sys.argv[1], sys.argv[2], "--shard-size", "4000"]
from dammerge.cli import main
main()
"""


@pytest.mark.slow
def test_killed_merge_leaves_no_output_and_the_next_run_cleans_up(llama_family, tmp_path):
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(yaml.safe_dump(recipe(llama_family)))
    out = tmp_path / "merged"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_MERGE), str(recipe_file), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    try:
        added = 0
        deadline = time.monotonic() + 120
        while added < 6 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "the merge ended before it could be killed"
            added += line.startswith("added")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = tmp_path / f".merged{TMP_MARKER}{child.pid}"
    assert stale.is_dir() and any(stale.iterdir())  # shards were being written there
    dammerge.merge(recipe(llama_family), out, progress=False)
    assert not stale.exists()
    assert leftovers(out) == ["merged"]
    AutoModelForCausalLM.from_pretrained(out)


def test_an_unwritable_output_is_refused_before_compute(
    llama_family, unwritable_folder, monkeypatch
):
    def no_compute(*args, **kwargs):
        raise AssertionError("a tensor was merged before the output was checked")

    monkeypatch.setattr(merge_module, "merge_tensor", no_compute)
    with pytest.raises(OutputError, match="cannot write") as info:
        dammerge.merge(recipe(llama_family), unwritable_folder / "merged", progress=False)
    assert info.value.hint


def test_the_saved_recipe_rebuilds_the_checkpoint_from_another_folder(
    llama_family, tmp_path, monkeypatch
):
    """A recipe with paths relative to the working folder (as users write them) is saved as
    ``dammerge_config.yml`` with paths relative to the checkpoint; merged from an unrelated
    working folder, it rebuilds the same checkpoint, every tensor equal."""
    base, variants = llama_family
    monkeypatch.chdir(base.parent)
    relative = {
        "merge_method": "dare_ties",
        "base_model": base.name,
        "models": [
            {"model": v.name, "parameters": {"weight": 0.5, "density": 0.6}} for v in variants
        ],
    }
    out = dammerge.merge(relative, tmp_path / "merged", progress=False, seed=5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = dammerge.merge(out / "dammerge_config.yml", tmp_path / "again", progress=False, seed=5)
    first, second = tensors_of(out), tensors_of(again)
    assert first.keys() == second.keys()
    for name, tensor in second.items():
        assert torch.equal(tensor, first[name]), name

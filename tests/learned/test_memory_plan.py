"""The memory plan against the engine's real tensors, the fit check before training, and running
out of memory during training (one message, the checkpoint kept, a resume that works)."""

from __future__ import annotations

import json

import pytest
import torch

import dammerge
from dammerge.checkpoint.reader import Checkpoint
from dammerge.learned import memory_plan as mp
from dammerge.learned import run as run_module
from dammerge.learned import train as train_module
from dammerge.learned.layers import MergedLinear, MergedParameterModule
from dammerge.learned.model import MergeOptions
from dammerge.learned.presets import DAM
from dammerge.learned.run import train_plan
from dammerge.learned.settings import parse_settings
from dammerge.learned.train import CHECKPOINT, TrainingOutOfMemory, out_of_memory

from .helpers import build_merged, training_plan

GIB = 2**30


def _shape(family) -> mp.ModelShape:
    return mp.ModelShape.from_checkpoint(Checkpoint(family[0]))


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# -- the model's shape and the resident tensors ---------------------------------------------
@pytest.mark.parametrize("family_name", ["untied_family", "tied_family"])
def test_shape_from_checkpoint_equals_shape_from_config(family_name, request):
    family = request.getfixturevalue(family_name)
    checkpoint = Checkpoint(family[0])
    assert mp.ModelShape.from_checkpoint(checkpoint) == mp.ModelShape.from_config(checkpoint.config)


@pytest.mark.parametrize("offload", ["none", "layers"])
@pytest.mark.parametrize(
    ("options", "on_the_fly"),
    [({}, True), ({"merge_embeddings": True, "merge_norms": True}, False)],
)
def test_resident_items_are_the_built_models_bytes(untied_family, offload, options, on_the_fly):
    settings = parse_settings(
        {"offload": offload, "teacher": "on_the_fly" if on_the_fly else "precomputed"}, DAM
    )
    settings = settings.model_copy(update=options)
    model = build_merged(
        untied_family,
        MergeOptions(**options),
        keep_teacher_weights=on_the_fly,
        offload=offload,
    )
    plan = mp.plan_memory(
        _shape(untied_family), settings, n_sources=2, dtype=torch.float32, device="cpu"
    )
    items = {item.name: item for item in plan.items}
    linears = [m for _, m in model.merge_modules() if isinstance(m, MergedLinear)]
    stores = sum(m.weights.numel() * m.weights.element_size() for m in linears)
    if offload == "layers":
        streamer = model.streamer
        two = sum(sorted((streamer.layer_bytes(k) for k in streamer.layers), reverse=True)[:2])
        head = sum(m.weights.numel() * 4 for m in linears if m.layer is None)
        assert items["stores"].host == stores - head
        assert items["stores"].device == two + head
    else:
        assert (items["stores"].device, items["stores"].host) == (stores, 0)
    others = [m for _, m in model.merge_modules() if isinstance(m, MergedParameterModule)]
    held = [getattr(m, f"stack_{n}") for m in others for n in m.stack_names]
    held += [p for m in others for p in m.inner.parameters()]
    assert items["embeddings and norms"].device == _bytes(held)
    coefficients = sum(p.numel() for p in model.coefficient_parameters())
    assert items["coefficients + optimizer"].device == coefficients * mp.ADAM_BYTES


# -- activations: the bytes a decoder layer really saves for backward ------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_bytes_per_token_are_what_a_layer_saves(untied_family, dtype):
    """Saved tensors of the second decoder layer (its input needs a gradient, as every layer's
    but the first does) on a padded batch, as the fused step sends: exactly the formula."""
    model = build_merged(untied_family, dtype=dtype)
    ids = torch.randint(3, 128, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a shorter sequence, padded
    layers = model.model.model.layers
    current = {"layer": None}
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=index: current.update(layer=i))
        layer.register_forward_hook(lambda *_: current.update(layer=None))
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    first_seen: dict[int, tuple[int | None, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            first_seen.setdefault(storage.data_ptr(), (current["layer"], storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, mask)
    saved = sum(n for layer, n in first_seen.values() if layer == 1)
    expected = mp.layer_activation_bytes(_shape(untied_family), dtype.itemsize, *ids.shape)
    assert saved == expected


def test_checkpointing_and_ranks_divide_what_they_should(untied_family):
    shape = _shape(untied_family)
    settings = parse_settings({}, DAM)
    common = {"n_sources": 4, "longest": 512, "dtype": torch.bfloat16}
    single = mp.plan_memory(shape, settings, **common)
    checkpointed = mp.plan_memory(
        shape, settings.model_copy(update={"gradient_checkpointing": True}), **common
    )
    assert checkpointed.activations[True] == single.activations[True]
    assert (
        checkpointed.device_peak - single.device_peak
        == (single.activations[True] - single.activations[False])
        < 0
    )
    shard = mp.plan_memory(shape, settings, strategy="shard", world_size=4, **common)
    replicate = mp.plan_memory(shape, settings, strategy="replicate", world_size=4, **common)
    items = {p: {i.name: i for i in plan.items} for p, plan in [("1", single), ("s", shard)]}
    layer = max(shape.layer_elems) * 4 * 2  # 4 stores × bf16
    head = shape.head_elems * 4 * 2
    layers = sum(shape.layer_elems) * 4 * 2
    assert items["s"]["stores"].device == layers // 4 + 2 * layer + head
    assert items["1"]["stores"].device == layers + head
    coefficients = items["1"]["coefficients + optimizer"].device
    assert items["s"]["coefficients + optimizer"].device == coefficients // 4
    # every rank holds a quarter of the step's sequences: activations and logits divide by 4
    assert replicate.activations[False] < single.activations[False] / 3
    assert replicate.items[0] == single.items[0]  # stores whole on every rank


def test_offload_moves_the_layers_to_host_memory_and_fits_a_small_gpu():
    llama_70b = {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_hidden_layers": 80,
        "vocab_size": 128256,
    }
    shape = mp.ModelShape.from_config(llama_70b)
    settings = parse_settings({"gradient_checkpointing": True}, DAM)
    common = {"n_sources": 3, "longest": 2048, "capacity": 80 * 10**9}
    resident = mp.plan_memory(shape, settings, **common)
    assert not resident.fits
    assert "offload: layers" in resident.advice
    streamed = mp.plan_memory(
        shape, settings.model_copy(update={"offload": "layers"}), host_capacity=2**40, **common
    )
    assert streamed.fits
    assert streamed.host_peak == 3 * sum(shape.layer_elems) * 2  # three copies of every layer
    assert streamed.host_peak > 380 * GIB
    too_little_host = mp.plan_memory(
        shape, settings.model_copy(update={"offload": "layers"}), host_capacity=GIB, **common
    )
    assert not too_little_host.fits


def test_advice_names_each_option_that_alone_makes_it_fit():
    mistral = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
    }
    plan = mp.plan_memory(
        mp.ModelShape.from_config(mistral),
        parse_settings({}, DAM),
        n_sources=3,
        longest=2048,
        capacity=70 * GIB,
    )
    assert plan.fits is False
    labels = "; ".join(plan.advice)
    assert "gradient_checkpointing: true" in labels and "offload: layers" in labels
    assert "training.distributed: shard over 2 ranks" in labels
    assert "max_length: " in labels
    length = int(next(a for a in plan.advice if a.startswith("max_length")).split()[-1])
    assert length % 64 == 0 and 64 <= length < 2048
    text = "\n".join(plan.lines())
    assert "does NOT fit" in text and "would fit with" in text
    with pytest.raises(mp.MemoryPlanError, match="would run out of memory") as caught:
        plan.require_fits()
    assert "\n" not in caught.value.message and "offload: layers" in caught.value.hint


# -- the fit check before training -----------------------------------------------------------
def test_run_that_will_not_fit_stops_before_training(
    untied_family, datasets_dir, dam_recipe, tmp_path, monkeypatch, capsys
):
    def no_training(*args, **kwargs):
        raise AssertionError("training started although the plan does not fit")

    monkeypatch.setattr(run_module, "train_plan", no_training)
    monkeypatch.setattr(mp, "device_available", lambda device: 64 * 1024)
    recipe = dam_recipe(*untied_family, datasets_dir)
    with pytest.raises(mp.MemoryPlanError, match="the memory plan needs") as caught:
        dammerge.merge(recipe, tmp_path / "out", dry_run=True)
    assert "\n" not in caught.value.message
    printed = capsys.readouterr().err
    assert "memory plan" in printed and "activations" in printed and "does NOT fit" in printed
    with pytest.raises(mp.MemoryPlanError):
        dammerge.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(mp.SKIP_ENV, "0")
    with pytest.raises(AssertionError, match="training started"):
        dammerge.merge(recipe, tmp_path / "out", progress=False)


def test_dry_run_prints_the_plan_of_the_data(untied_family, datasets_dir, dam_recipe, tmp_path):
    plan = training_plan(
        dam_recipe, untied_family, datasets_dir, tmp_path / "out", teacher="precomputed"
    )
    memory = mp.plan_run(plan)
    longest = max(len(e.input_ids) for d in plan.data for e in d.examples)
    assert f"longest example {longest} tokens" in memory.description
    assert memory.fits and memory.capacity
    assert memory.teacher_disk == sum(d.token_count() for d in plan.data) * 64 * 8
    assert any("teacher files on disk" in line for line in memory.lines())


# -- out of memory during training -----------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 1125899906842624 bytes."
        ),
    ],
    ids=["cuda", "python", "cpu-allocator"],
)
def test_out_of_memory_stops_with_the_step_and_keeps_the_checkpoint(
    untied_family, datasets_dir, dam_recipe, tmp_path, monkeypatch, error
):
    options = {"steps": 4, "checkpoint_every": 2}
    reference, _ = train_plan(
        training_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "a", **options),
        progress=False,
    )
    original = train_module.Trainer.train_step

    def failing(self):
        if self.step == 2:
            self.step_length = 17
            raise error
        return original(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", failing)
    plan = training_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "b", **options)
    with pytest.raises(TrainingOutOfMemory) as caught:
        train_plan(plan, progress=False)
    message, hint = caught.value.message, caught.value.hint
    assert "\n" not in message and "step 3" in message and "up to 17 tokens" in message
    assert "checkpoint (step 2) is kept" in message
    for option in ("gradient_checkpointing", "teacher: precomputed", "offload: layers"):
        assert option in hint
    assert "shard" in hint and "max_length below 17" in hint
    saved = torch.load(plan.work_dir / CHECKPOINT, weights_only=True)
    assert saved["step"] == 2
    monkeypatch.setattr(train_module.Trainer, "train_step", original)
    # with memory-saving options switched on, the run resumes from that checkpoint
    resumed_plan = training_plan(
        dam_recipe,
        untied_family,
        datasets_dir,
        tmp_path / "b",
        gradient_checkpointing=True,
        offload="layers",
        **options,
    )
    model, result = train_plan(resumed_plan, progress=False)
    assert result.resumed_from == 2 and result.steps == 4
    for name, value in reference.coefficient_state().items():
        torch.testing.assert_close(model.coefficient_state()[name], value, rtol=0, atol=1e-6)
    log = [
        json.loads(line) for line in (plan.work_dir / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))
    assert out_of_memory(torch.OutOfMemoryError("out of memory"))

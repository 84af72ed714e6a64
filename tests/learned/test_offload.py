"""Layer streaming (``training.offload: layers``) on CPU: the same coefficients as resident stores,
never more than two decoder layers' stores resident, backward fetching them again."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dammerge.checkpoint.reader import Checkpoint
from dammerge.errors import ConfigError
from dammerge.learned import offload
from dammerge.learned.layers import MergedLinear
from dammerge.learned.presets import DAM
from dammerge.learned.run import train_plan
from dammerge.learned.settings import parse_settings
from dammerge.learned.train import enable_gradient_checkpointing

from .helpers import DEEP_LAYERS, IDS, build_merged, prepare_recipe, training_plan

LAYERS = DEEP_LAYERS


def _train(dam_recipe, family, data, out, **options):
    plan = training_plan(dam_recipe, family, data, out, **options)
    model, result = train_plan(plan, progress=False)
    assert result.steps == options["steps"]
    return model.coefficient_state()


@pytest.mark.parametrize(
    "options",
    [
        {"dtype": "float32"},
        {"dtype": "float32", "gradient_checkpointing": True},
        {"dtype": "bfloat16"},
        {"dtype": "float32", "teacher": "precomputed", "top_k": 16, "lambda_cos": 0.5},
    ],
    ids=["fp32", "fp32-checkpointing", "bf16", "fp32-precomputed"],
)
def test_streamed_training_gives_the_resident_coefficients_bit_for_bit(
    deep_family, datasets_dir, tmp_path, dam_recipe, residency, options
):
    common = {"steps": 3, "lr": 0.01, **options}
    resident = _train(dam_recipe, deep_family, datasets_dir, tmp_path / "a", **common)
    assert not residency.streamers
    streamed = _train(
        dam_recipe, deep_family, datasets_dir, tmp_path / "b", offload="layers", **common
    )
    assert resident.keys() == streamed.keys()
    for name in resident:
        assert torch.equal(streamed[name], resident[name]), name
    moved = max(float((t - 0.5).abs().max()) for t in streamed.values())
    assert moved > 1e-4  # training did move the coefficients
    assert len(residency.streamers) == 1
    assert residency.most == 2
    assert {layer for s in residency.sets for layer in s} == set(range(LAYERS))


def test_tied_model_streams_its_layers_and_keeps_the_head(
    tied_family, datasets_dir, tmp_path, dam_recipe, residency
):
    common = {"steps": 2, "lr": 0.01, "merge_embeddings": True}
    resident = _train(dam_recipe, tied_family, datasets_dir, tmp_path / "a", **common)
    streamed = _train(
        dam_recipe, tied_family, datasets_dir, tmp_path / "b", offload="layers", **common
    )
    for name in resident:
        assert torch.equal(streamed[name], resident[name]), name
    assert residency.most <= 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_fetches_the_layers_again(deep_family, checkpointing):
    """One forward and backward: the same gradients as resident stores, two layers at most on
    the device, and the first layers (evicted during the forward) copied again for backward."""
    resident = build_merged(deep_family)
    streamed = build_merged(deep_family, offload="layers")
    streamer = streamed.streamer
    assert streamer is not None and streamer.layers == list(range(LAYERS))
    sets: list[tuple[int, ...]] = []
    streamer.observe(sets.append)
    grads = []
    for model in (resident, streamed):
        if checkpointing:
            enable_gradient_checkpointing(model.model)
        loss = model(IDS).float().logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.coefficient_groups()})
    for name in grads[0]:
        assert torch.equal(grads[1][name], grads[0][name]), name
    assert max(len(s) for s in sets) == 2
    # forward: every layer once; backward: all but the two still resident after the forward
    assert streamer.fetches == LAYERS + (LAYERS - 2)
    assert sets[-1] == (0, 1)


def test_streamed_stores_stay_in_host_memory_and_the_rest_is_resident(deep_family):
    model = build_merged(deep_family, offload="layers")
    linears = {n: m for n, m in model.merge_modules() if isinstance(m, MergedLinear)}
    streamed = {n for n, m in linears.items() if m.store_source is not None}
    assert streamed == {n for n in linears if ".layers." in n}
    assert "lm_head" in linears and linears["lm_head"].store_source is None
    module = linears["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        model(IDS)  # the last forward leaves layers 0 (predicted next) and 3 resident
    copy, _ = module.stores()
    assert torch.equal(copy, module.weights) and copy.data_ptr() != module.weights.data_ptr()
    assert model.streamer.layer_bytes(0) == sum(
        m.weights.numel() * m.weights.element_size() for m in linears.values() if m.layer == 0
    )


def test_teacher_mode_streams_the_selected_source(deep_family):
    resident = build_merged(deep_family)
    streamed = build_merged(deep_family, offload="layers")
    with torch.no_grad():
        for i in range(2):
            with resident.teacher(i), streamed.teacher(i):
                assert torch.equal(streamed(IDS), resident(IDS))


def _layerless_checkpoint(folder):
    """A checkpoint whose linears belong to no decoder layer dammerge recognises."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    tensors = {"encoder.dense.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(8, 4)}
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_offload_without_known_decoder_layers_is_one_line_error(tmp_path, datasets_dir):
    folder = _layerless_checkpoint(tmp_path / "mystery")
    with pytest.warns(UserWarning, match="not known to dammerge"):
        base = Checkpoint(folder)
    with pytest.raises(ConfigError, match="needs decoder layers") as caught:
        offload.check_offloadable(base)
    assert "\n" not in caught.value.message and "offload: none" in caught.value.hint
    recipe = {
        "merge_method": "dam",
        "base_model": str(folder),
        "models": [
            {"model": str(folder), "dataset": {"path": str(datasets_dir / f"d{i}.jsonl")}}
            for i in range(2)
        ],
        "training": {"offload": "layers"},
    }
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="needs decoder layers"):
        prepare_recipe(recipe, tmp_path / "out")


def test_offload_setting_is_validated():
    assert parse_settings({}, DAM).offload == "none"
    assert parse_settings({"offload": "layers"}, DAM).offload == "layers"
    with pytest.raises(ConfigError, match=r"training\.offload"):
        parse_settings({"offload": "disk"}, DAM)


def test_host_arena_hands_out_disjoint_views_of_power_of_two_segments():
    """Pinned memory is allocated in powers of two (nothing for the allocator to round up)
    and the stores are views placed in them with little left over."""
    shapes = [(3, 64, 32), (3, 16, 32), (3, 16, 32), (3, 32, 64), (3, 5)] * 6
    sizes = [math.prod(s) * 2 for s in shapes]
    arena = offload.HostArena(sum(sizes), max(sizes), pin=False, segment_bytes=2**15)
    views = [arena.empty(shape, torch.bfloat16) for shape in shapes]
    assert all(
        v.shape == s and v.dtype == torch.bfloat16 for v, s in zip(views, shapes, strict=True)
    )
    assert all(seg.numel() & (seg.numel() - 1) == 0 for seg in arena.segments)
    assert len(arena.segments) > 1  # the test spans several segments
    spans = sorted(
        (v.untyped_storage().data_ptr(), v.data_ptr(), v.data_ptr() + v.numel() * 2) for v in views
    )
    for (storage_a, _, end_a), (storage_b, start_b, _) in itertools.pairwise(spans):
        assert storage_a != storage_b or end_a <= start_b
    for i, view in enumerate(views):
        view.fill_(i)
    assert all(bool((view == i).all()) for i, view in enumerate(views))
    assert arena.reserved < 1.5 * sum(sizes)


def test_offload_under_shard_plans_a_kth_of_the_layers_in_host_memory(
    untied_family, datasets_dir, dam_recipe, tmp_path
):
    from dammerge.learned.distributed import Distributed
    from dammerge.learned.run import memory_plan

    plan = training_plan(
        dam_recipe, untied_family, datasets_dir, tmp_path / "out", offload="layers"
    )
    one = memory_plan(plan, Distributed(torch.device("cpu")))
    sharded = memory_plan(
        plan, Distributed(torch.device("cpu"), world_size=2, backend="gloo", strategy="shard")
    )
    stores = {p.strategy: next(i for i in p.items if i.name == "stores") for p in (one, sharded)}
    assert sharded.strategy == "shard"
    assert stores["shard"].host == pytest.approx(stores["single"].host / 2, rel=0.01)
    assert stores["shard"].device == stores["single"].device  # two whole layers while computing

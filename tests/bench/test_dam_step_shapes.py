"""bench/dam_step.py's command line, shape table, layer fitting, random families and targets
(no timings: those are the benchmark's own business)."""

from __future__ import annotations

import pytest
import torch

from .loading import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("dam_step")


def _config(bench, *argv: str):
    args = bench.parse_args(list(argv))
    return args, bench.config_for(args)


def test_default_quick_and_gpu_configurations(bench):
    _, cfg = _config(bench)
    assert cfg == bench.FULL and cfg.device == "cpu" and cfg.kernels == ("auto",)
    assert bench.default_output(cfg).name == "dam_step.json"
    _, cfg = _config(bench, "--quick")
    assert cfg == bench.QUICK and bench.default_output(cfg).name == "dam_step_quick.json"
    args, cfg = _config(bench, "--gpu")
    assert (cfg.shape, cfg.device, cfg.dtype, cfg.seq_len) == ("small", "cuda", "bfloat16", 512)
    assert cfg.size.hidden == 2048 and cfg.reference and not bench.needs_fit(args, cfg)
    assert cfg.targets == {
        "on_the_fly_vs_plain": 2.0,
        "precomputed_vs_plain": 1.5,
        "memory_vs_plain_plus_stores": 1.0,
    }
    assert bench.default_output(cfg).name == "dam_step_gpu.json"


def test_the_7b_shape_has_mistral_7b_widths_and_its_targets(bench):
    args, cfg = _config(bench, "--gpu", "--shape", "7b")
    size = cfg.size
    assert (size.hidden, size.intermediate, size.vocab) == (4096, 14336, 32000)
    assert (size.heads, size.kv_heads) == (32, 8)
    assert (cfg.seq_len, cfg.ns, cfg.dtype, cfg.device) == (2048, (2, 3, 5), "bfloat16", "cuda")
    assert not cfg.reference and "reference" not in cfg.variants
    assert bench.needs_fit(args, cfg)  # as many layers as fit, found on the device
    assert cfg.targets["on_the_fly_vs_plain"] == 1.5
    assert cfg.targets["precomputed_vs_plain"] == 1.15
    assert bench.default_output(cfg).name == "dam_step_gpu_7b.json"
    args, cfg = _config(bench, "--gpu", "--shape", "7b", "--layers", "6")
    assert cfg.size.layers == 6 and not bench.needs_fit(args, cfg)


def test_the_7b_shape_on_a_cpu_is_a_one_layer_smoke_run(bench):
    args, cfg = _config(bench, "--shape", "7b", "--ns", "2", "--seq-len", "32")
    assert (cfg.device, cfg.size.layers, cfg.size.hidden) == ("cpu", 1, 4096)
    assert (cfg.ns, cfg.memory_n, cfg.seq_len) == ((2,), 2, 32)
    assert not bench.needs_fit(args, cfg)
    assert bench.default_output(cfg).name == "dam_step_7b_cpu.json"


def test_the_host_shape_is_the_small_shapes_depth_at_toy_widths_without_targets(bench):
    """A CPU proxy of the small GPU shape's host time: its 8 layers, both kernels, no targets
    (judging it against the GPU's would pass or fail the wrong thing)."""
    _, cfg = _config(bench, "--shape", "host")
    assert (cfg.device, cfg.size.layers) == ("cpu", bench.GPU.size.layers)
    assert cfg.size.hidden == 64 and cfg.ns == (2, 3, 5) and not cfg.reference
    assert cfg.kernels == ("compiled", "eager", "layers") and cfg.targets == {}
    assert bench.default_output(cfg).name == "dam_step_host.json"
    ratios = {v: 2.5 for v in cfg.variants}
    timing = {f"N={n}": {"ratio_vs_plain": ratios, "median_s": ratios} for n in cfg.ns}
    assert bench.targets(cfg, timing, None) == []


def test_kernels_give_one_variant_per_teacher_mode_and_value(bench):
    _, cfg = _config(bench, "--kernels", "compiled,eager", "--ns", "5,2,3", "--repeats", "4")
    assert cfg.kernels == ("compiled", "eager") and cfg.ns == (2, 3, 5) and cfg.repeats == 4
    assert cfg.variants == [
        "plain",
        "ours_on_the_fly[compiled]",
        "ours_precomputed[compiled]",
        "ours_on_the_fly[eager]",
        "ours_precomputed[eager]",
        "reference",
    ]
    assert bench.parse_variant("ours_precomputed[eager]", cfg) == ("precomputed", "eager")
    _, single = _config(bench, "--kernels", "compiled", "--no-reference")
    assert single.variants == ["plain", "ours_on_the_fly", "ours_precomputed"]
    assert bench.parse_variant("ours_on_the_fly", single) == ("on_the_fly", "compiled")


@pytest.mark.parametrize(
    "argv",
    [
        ["--kernels", "fast"],
        ["--kernels", "eager,eager"],
        ["--ns", "0,2"],
        ["--ns", "two"],
        ["--layers", "0"],
        ["--layers", "many"],
        ["--quick", "--shape", "7b"],
        ["--seq-len", "1"],
        ["--shape", "70b"],
    ],
)
def test_bad_arguments_are_refused(bench, argv):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2


def test_layers_that_fit_grow_with_memory_and_shrink_with_sources(bench):
    size, gib = bench.MISTRAL_7B, 2**30
    layer_params = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336  # q, k, v, o, MLP
    h200 = bench.layers_that_fit(size, 5, 2048, 2, 139 * gib)
    assert 10 <= h200 <= 24  # ~6 GB a layer: 9 bf16 copies of 218M weights + activations
    assert bench.layers_that_fit(size, 5, 2048, 2, 0) == 0
    assert bench.layers_that_fit(size, 2, 2048, 2, 139 * gib) > h200
    assert bench.layers_that_fit(size, 5, 2048, 2, 139 * gib, dam_models=2) < h200
    assert bench.layers_that_fit(size, 5, 2048, 2, 10**15) == size.layers  # never past 32
    # one more layer costs at least its weights' nine copies (plain: 4, stores: 5)
    more = bench.layers_that_fit(size, 5, 2048, 2, 139 * gib + 9 * 2 * layer_params)
    assert more <= h200 + 1


def test_a_direct_family_is_a_loadable_base_and_perturbed_sources(bench, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(bench, "WORK", tmp_path)
    size = bench.ModelSize(hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, vocab=96)
    base, sources = bench.ensure_direct_family(size, 2, torch.float32, torch.device("cpu"))
    assert len(sources) == 2
    weights = [load_file(folder / "model.safetensors") for folder in (base, *sources)]
    on_disk = sum((folder / "model.safetensors").stat().st_size for folder in (base, *sources))
    assert 0 < on_disk - bench.family_bytes(size, 2, 4) < 3 * 2**16  # tensors + headers
    name = "model.layers.1.mlp.down_proj.weight"
    assert weights[0][name].shape == (32, 64)
    assert 0.015 < float(weights[0][name].std()) < 0.025
    assert torch.equal(weights[0]["model.norm.weight"], torch.ones(32))
    noise = weights[1][name] - weights[0][name]
    assert 0.015 < float(noise.std()) < 0.025  # each source: its own N(0, 0.02²) noise
    assert not torch.equal(weights[1][name], weights[2][name])
    model = AutoModelForCausalLM.from_pretrained(sources[0])
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, weights[1]["lm_head.weight"])
    again = bench.ensure_direct_family(size, 2, torch.float32, torch.device("cpu"))
    assert again == (base, sources)  # reused, not drawn again


def test_targets_judge_ratios_and_device_memory(bench):
    _, cfg = _config(bench, "--gpu", "--shape", "7b", "--layers", "2", "--ns", "2")
    timing = {
        "N=2": {
            "ratio_vs_plain": {"plain": 1.0, "ours_on_the_fly": 1.4, "ours_precomputed": 1.2},
        }
    }
    on_device = {
        "N=2": {
            "peak_bytes": {"plain": 100, "ours_on_the_fly": 130, "ours_precomputed": 90},
            "store_bytes": 20,
        }
    }
    checks = {c["name"]: c["pass"] for c in bench.targets(cfg, timing, None, on_device)}
    assert checks == {
        "on-the-fly / plain, N=2": True,  # 1.4 <= 1.5
        "precomputed / plain, N=2": False,  # 1.2 > 1.15
        "peak memory ours_on_the_fly / (plain + stores), N=2": False,  # 130 > 120
        "peak memory ours_precomputed / (plain + stores), N=2": True,
    }


def test_the_targets_printer_reads_both_result_layouts(tmp_path):
    targets = load_bench("targets")
    import json

    dam = {
        "targets": [{"name": "a / plain", "value": 1.2, "target": "<= 1.5", "pass": True}],
        "compile_fallback": None,
        "timing": {"N=2": {"kernels_ran": {"ours_on_the_fly[compiled]": "compiled"}}},
    }
    merge = {"targets": {"time_vs_io_bound": {"target_at_most": 2.0, "value": 3.5, "pass": False}}}
    (tmp_path / "dam.json").write_text(json.dumps(dam))
    (tmp_path / "merge.json").write_text(json.dumps(merge))
    assert targets.target_lines(dam) == [(True, "a / plain: 1.200 (target <= 1.5)")]
    assert targets.target_lines(merge) == [(False, "time_vs_io_bound: 3.500 (target <= 2.0)")]
    assert targets.notes(dam) == ["kernels ran: ours_on_the_fly[compiled] compiled"]
    assert "gave up compiling 1 function" in targets.notes({**dam, "compile_give_ups": 1})[0]
    assert targets.main([str(tmp_path / "dam.json")]) == 0
    assert targets.main([str(tmp_path / "dam.json"), str(tmp_path / "merge.json")]) == 1
    assert targets.main([str(tmp_path / "missing.json")]) == 1

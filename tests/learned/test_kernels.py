"""The compiled store passes (``training.kernels``) against the eager ones and the definition.

The definition: the merged weight is ``Σ_m W_m · diag(s_m)`` and the coefficient gradient is
what autograd gives for it in float64 (:func:`naive_merged_linear`). Inductor compiles on a CPU
with the system's C++ compiler; the shapes are tiny and few (each new number of sources or dtype
is one more compilation), and leave vector tails (13, 17 columns; 7, 3 rows).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from dammerge.errors import ConfigError
from dammerge.learned import kernels
from dammerge.learned.functional import EAGER, merged_linear, naive_merged_linear
from dammerge.learned.kernels import (
    CompiledLayerForward,
    CompiledPasses,
    compiled_passes,
    store_passes,
)
from dammerge.learned.layers import frozen
from dammerge.learned.model import MergeOptions
from dammerge.learned.presets import DAM
from dammerge.learned.run import train_plan
from dammerge.learned.settings import parse_settings
from dammerge.testing import make_family

from .helpers import (
    IDS,
    build_merged,
    column_grads_through,
    merged_weight_through,
    prepare_recipe,
    training_plan,
)

SHAPES = [(7, 13), (3, 17)]  # (out, in): tails for every vector width, two layer shapes


@pytest.fixture(autouse=True)
def no_fallback(monkeypatch):
    """Each test starts (and leaves) the process without a recorded compile failure."""
    monkeypatch.setattr(kernels, "_fallback_reason", None)


def _layer(n, out, inp, dtype=torch.float64, seed=0, tokens=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, inp, dtype=dtype, generator=g)
    scales = torch.randn(n, inp, dtype=dtype, generator=g)
    weights = torch.randn(n, out, inp, dtype=dtype, generator=g)
    bias_scales = torch.randn(n, dtype=dtype, generator=g)
    biases = torch.randn(n, out, dtype=dtype, generator=g)
    upstream = torch.randn(*tokens, out, dtype=dtype, generator=g)
    return x, scales, weights, bias_scales, biases, upstream


def _definition(scales, weights):
    """The merged weight written as the formula (a broadcast product summed over sources)."""
    return (weights * scales[:, None, :]).sum(0)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_compiled_passes_equal_eager_and_the_definition(n):
    compiled = compiled_passes()
    for out, inp in SHAPES:
        x, scales, weights, _, _, upstream = _layer(n, out, inp)
        expected = _definition(scales, weights)
        for passes in (compiled, EAGER):
            merged = merged_weight_through(passes, scales, weights, torch.float64)
            torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)
        # the column gradient: autograd of ⟨upstream, x · W(s)ᵀ⟩ with respect to s
        leaf = scales.clone().requires_grad_(True)
        output = x @ _definition(leaf, weights).T
        (reference,) = torch.autograd.grad(output, leaf, upstream)
        g2, x2 = upstream.reshape(-1, out), x.reshape(-1, inp)
        for passes in (compiled, EAGER):
            grads = column_grads_through(passes, g2, x2, scales, weights)
            torch.testing.assert_close(grads, reference, rtol=1e-12, atol=1e-12)
    assert kernels.fallback_reason() is None


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("needs", ["x and scales", "scales only", "x only"])
def test_merged_linear_with_compiled_passes_and_bias_matches_autograd(n, needs):
    """Forward values and the gradients of x, the scales and the bias scales, float64, through
    the compiled forward and backward (one compiled call each); a layer whose input needs no
    gradient (the first one) or whose scales need none skips that part."""
    for out, inp in SHAPES:
        x, scales, weights, bias_scales, biases, upstream = _layer(n, out, inp, seed=1)
        leaves = [t.clone() for t in (x, scales, bias_scales)]
        leaves[0].requires_grad_(needs != "scales only")
        leaves[1].requires_grad_(needs != "x only")
        leaves[2].requires_grad_(True)
        wanted = [t for t in leaves if t.requires_grad]
        results = []
        for fn in (merged_linear, naive_merged_linear):
            kwargs = {"passes": compiled_passes()} if fn is merged_linear else {}
            y = fn(leaves[0], leaves[1], weights, leaves[2], biases, **kwargs)
            results.append((y, *torch.autograd.grad(y, wanted, upstream)))
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert kernels.fallback_reason() is None


def test_compiled_layer_passes_with_bf16_stores_match_eager():
    """The compiled forward and backward calls against the eager passes with bf16 weights and
    activations and float32 coefficients (the GPU's case): the same products, the merge and
    the column sums in float32 in both."""
    x, scales, weights, _, biases, upstream = _layer(5, 7, 13, dtype=torch.float32, seed=3)
    weights, x, upstream, bias = weights.bfloat16(), x.bfloat16(), upstream.bfloat16(), None
    compiled = compiled_passes()
    for bias in (None, biases[0].bfloat16()):
        y = compiled.linear(x, scales, weights, bias)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, EAGER.linear(x, scales, weights, bias))
    g2, x2 = upstream.reshape(-1, 7), x.reshape(-1, 13)
    grad_x, grads = compiled.backward(g2, x2, scales, weights, True, True)
    eager_x, eager_grads = EAGER.backward(g2, x2, scales, weights, True, True)
    assert grad_x.dtype == torch.bfloat16 and grads.dtype == torch.float32
    torch.testing.assert_close(grad_x, eager_x)
    torch.testing.assert_close(grads, eager_grads)
    assert compiled.backward(g2, x2, scales, weights, False, False) == (None, None)


def test_compiled_passes_with_bf16_stores_match_eager():
    """bf16 weights and activations, float32 coefficients: both accumulate in float32 and
    round once, so they differ by the order of float32 additions at most."""
    x, scales, weights, _, _, upstream = _layer(5, 7, 13, dtype=torch.float32, seed=2)
    weights, x, upstream = weights.bfloat16(), x.bfloat16(), upstream.bfloat16()
    compiled = compiled_passes()
    merged = merged_weight_through(compiled, scales, weights, torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    expected = EAGER.merged(scales, weights, torch.bfloat16)
    torch.testing.assert_close(merged.float(), expected.float(), rtol=8e-3, atol=1e-6)
    g2, x2 = upstream.reshape(-1, 7), x.reshape(-1, 13)
    grads = column_grads_through(compiled, g2, x2, scales, weights)
    assert grads.dtype == torch.float32
    torch.testing.assert_close(grads, EAGER.column_grads(g2, x2, scales, weights))


def test_compiled_once_per_number_of_sources_whatever_the_shapes_and_tokens():
    """Layer shapes, token counts, coefficient granularity (an expanded scale row) and
    requires_grad do not recompile; a different number of sources does, once. The stores are
    frozen parameters, as in a merge module (dynamo would give their shapes static sizes)."""
    torch._dynamo.reset()  # recompile limits count per function across earlier tests' dtypes
    counter = CompileCounter()
    passes = CompiledPasses(backend=counter)
    try:
        for out, inp in [(7, 13), (3, 17), (16, 8), (16, 16), (9, 11), (5, 5), (12, 4), (4, 12)]:
            for tokens in [(1, 5), (2, 9)]:
                x, scales, store, _, _, upstream = _layer(3, out, inp, tokens=tokens)
                weights = frozen(store)
                coarse = scales[:, :1].expand(3, inp)
                for s in (scales, coarse, scales.clone().requires_grad_(True)):
                    passes.linear(x, s, weights, None)
                    passes.backward(
                        upstream.reshape(-1, out), x.reshape(-1, inp), s, weights, True, True
                    )
        assert counter.frame_count == 2  # a layer's forward and its backward
        x, scales, weights, _, _, upstream = _layer(4, 7, 13)
        passes.linear(x, scales, weights, None)
        passes.backward(upstream.reshape(-1, 7), x.reshape(-1, 13), scales, weights, True, True)
        assert counter.frame_count == 4
    finally:
        torch._dynamo.reset()  # leave no counting entries in the shared compile caches


def _failing_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found\nsecond line of the compiler's report")


def test_a_failed_compilation_falls_back_to_eager_with_one_warning_line(capsys):
    passes = CompiledPasses(backend=_failing_backend)
    try:
        for seed in range(2):
            x, scales, weights, _, _, upstream = _layer(2, 7, 13, seed=seed)
            merged = merged_weight_through(passes, scales, weights, torch.float64)
            torch.testing.assert_close(merged, _definition(scales, weights))
            g2, x2 = upstream.reshape(-1, 7), x.reshape(-1, 13)
            grads = column_grads_through(passes, g2, x2, scales, weights)
            torch.testing.assert_close(grads, EAGER.column_grads(g2, x2, scales, weights))
    finally:
        torch._dynamo.reset()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: compiled merge kernels unavailable")
    assert "no C++ compiler found" in lines[0] and "eager" in lines[0]
    assert "no C++ compiler found" in (kernels.fallback_reason() or "")
    assert store_passes("compiled", "cpu") is EAGER  # for the rest of the process


def test_running_out_of_memory_in_a_compiled_pass_is_not_a_compile_failure():
    passes = CompiledPasses(backend=CompileCounter())

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    passes._linear = passes._backward = out_of_memory
    x, scales, weights, _, _, upstream = _layer(2, 7, 13)
    with pytest.raises(torch.OutOfMemoryError):
        passes.linear(x, scales, weights, None)
    with pytest.raises(torch.OutOfMemoryError):
        passes.backward(upstream.reshape(-1, 7), x.reshape(-1, 13), scales, weights, True, True)
    assert kernels.fallback_reason() is None


def test_store_passes_by_setting_and_device(monkeypatch, capsys):
    assert store_passes("eager", "cpu") is EAGER
    assert store_passes("auto", "cpu") is EAGER  # a CPU keeps its cache-blocked eager passes
    assert isinstance(store_passes("compiled", "cpu"), CompiledPasses)
    monkeypatch.setattr(kernels, "compile_unavailable", lambda device: None)
    assert isinstance(store_passes("auto", "cuda"), CompiledPasses)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(kernels, "compile_unavailable", lambda device: "Triton is not installed")
    assert store_passes("auto", "cuda") is EAGER
    assert store_passes("compiled", "cuda") is EAGER
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Triton is not installed" in err


def test_kernels_setting_is_validated():
    assert parse_settings(None, DAM).kernels == "auto"
    assert parse_settings({"kernels": "compiled"}, DAM).kernels == "compiled"
    with pytest.raises(ConfigError, match=r"training\.kernels"):
        parse_settings({"kernels": "fast"}, DAM)


def test_tied_head_with_merged_embeddings_under_compiled_passes(tied_family):
    """The tied head goes through the merged linear function with the model's passes."""
    model = build_merged(tied_family, MergeOptions(merge_embeddings=True))
    results = []
    for passes in (EAGER, compiled_passes()):
        model.use_passes(passes)
        model.zero_grad(set_to_none=True)
        logits = model(IDS)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.coefficient_parameters()]
        results.append((logits.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for compiled, eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    assert kernels.fallback_reason() is None


DOMAINS = ("lang", "math")  # two sources: the compiled passes of the tied-head test serve


def _micro_recipe(family, **training) -> dict:
    return {
        "merge_method": "dam",
        "base_model": str(family / "base"),
        "models": [
            {
                "model": str(family / domain),
                "dataset": {"path": str(family / "data" / domain / "train.jsonl"), "samples": 4},
            }
            for domain in DOMAINS
        ],
        "training": {"steps": 3, "max_length": 64, **training},
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("choice", "training"),
    [
        ("compiled", {}),
        ("layers", {}),  # teachers on the fly: merged and batched-teacher graphs of each layer
        ("layers", {"teacher": "precomputed", "top_k": 16, "gradient_checkpointing": True}),
    ],
)
def test_dam_training_with_compiled_kernels_follows_eager(micro_family, tmp_path, choice, training):
    states = {}
    for kernels_choice in ("eager", choice):
        recipe = _micro_recipe(micro_family, kernels=kernels_choice, **training)
        plan = prepare_recipe(recipe, tmp_path / kernels_choice / "out")
        model, result = train_plan(plan, progress=False)
        assert result.steps == 3
        expected = type(EAGER) if kernels_choice == "eager" else CompiledPasses
        assert type(model.model.lm_head.passes) is expected
        layers = kernels.decoder_layers(model.model)
        compiled = [isinstance(m.__dict__.get("forward"), CompiledLayerForward) for m in layers]
        assert layers and compiled == [kernels_choice == "layers"] * len(layers)
        states[kernels_choice] = model.coefficient_state()
    assert kernels.fallback_reason() is None
    moved = 0.0
    for name, value in states["eager"].items():
        torch.testing.assert_close(states[choice][name], value, rtol=0, atol=1e-5, msg=name)
        moved = max(moved, float((value - 1 / 2).abs().max()))
    assert moved > 1e-3  # training moved the coefficients: the comparison means something


def test_compiled_layers_fall_back_to_their_own_forward_and_can_be_undone(untied_family, capsys):
    """A layer whose compilation fails runs its own forward (one warning line, the same
    logits); ``enabled=False`` gives every layer its class's forward back."""
    model = build_merged(untied_family)
    try:
        with torch.no_grad():
            expected = model(IDS)
            assert kernels.compile_layers(model.model, backend=_failing_backend) == 2
            assert kernels.compile_layers(model.model, backend=_failing_backend) == 0  # again
            torch.testing.assert_close(model(IDS), expected, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
    assert kernels.fallback_reason() is not None
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0], lines
    assert kernels.compile_layers(model.model, enabled=False) == 2
    assert all("forward" not in m.__dict__ for m in kernels.decoder_layers(model.model))


def _counting_backend():
    """AOTAutograd without a compiler: ``counts`` says how many forward graphs were compiled
    and how many times one ran (a layer in pieces, split by graph breaks, runs several)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    counts = {"compiled": 0, "ran": 0}

    def forward_compiler(graph, example_inputs):
        counts["compiled"] += 1

        def run(*args):
            counts["ran"] += 1
            return graph.forward(*args)

        return make_boxed_func(run)

    def backward_compiler(graph, example_inputs):
        return make_boxed_func(graph.forward)

    return counts, aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)


def test_every_layer_runs_compiled_past_dynamos_recompile_limit(tmp_path):
    """Twelve layers (dynamo keeps at most 8 compiled entries per function): each layer's
    forward runs its compiled graph, compiled once for all of them (twice: see below)."""
    layers = 12
    base, sources = make_family(
        tmp_path, "llama", n=2, tie_word_embeddings=False, num_hidden_layers=layers
    )
    model = build_merged((base, sources))
    model.use_passes(compiled_passes())  # as the trainer does under training.kernels: layers
    counts, backend = _counting_backend()
    torch._dynamo.reset()
    try:
        assert kernels.compile_layers(model.model, backend=backend) == layers
        for _ in range(2):
            model(IDS).float().square().mean().backward()
    finally:
        torch._dynamo.reset()
        kernels.compile_layers(model.model, enabled=False)
    assert counts["ran"] == 2 * layers
    assert counts["compiled"] == 2  # the first layer's input needs no gradient, the rest do
    assert kernels.fallback_reason() is None


def test_batched_teachers_run_each_compiled_layer_whole(untied_family):
    """The norms' first-use check (data-dependent) runs in eager code: after it, each layer
    of the teachers' batched forward is one compiled graph, not pieces between graph breaks
    (which, compiled at the first call, would stay for good); the same logits."""
    model = build_merged(untied_family, keep_teacher_weights=True)
    model.use_passes(compiled_passes())
    layers = len(kernels.decoder_layers(model.model))
    ids = torch.cat([IDS, IDS.flip(0)])
    with torch.no_grad(), model.teachers([0, 1]):
        expected = model(ids)
    model = build_merged(untied_family, keep_teacher_weights=True)  # the check due again
    model.use_passes(compiled_passes())
    counts, backend = _counting_backend()
    torch._dynamo.reset()
    ran = []
    try:
        kernels.compile_layers(model.model, backend=backend)
        for _ in range(3):
            with torch.no_grad(), model.teachers([0, 1]):
                logits = model(ids)
            ran.append(counts["ran"])
    finally:
        torch._dynamo.reset()
        kernels.compile_layers(model.model, enabled=False)
    assert ran == [0, layers, 2 * layers]  # eager while the check is due, then whole layers
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_compile_give_ups_counts_dynamos_recompile_limit():
    from torch._dynamo.utils import counters

    def double(x):
        return x * 2

    before = kernels.compile_give_ups()
    try:
        for _ in range(torch._dynamo.config.recompile_limit + 2):  # the cache missed each time
            torch.compile(double, backend=lambda graph, example_inputs: graph.forward)(
                torch.ones(3)
            )
        assert kernels.compile_give_ups() == before + 1  # once: dynamo then stops trying
    finally:
        torch._dynamo.reset()
        counters["unimplemented"].clear()


def test_training_says_once_when_compiling_gave_up(
    untied_family, datasets_dir, tmp_path, dam_recipe, capsys, monkeypatch
):
    import dammerge.learned.train as train_module

    calls = iter(range(100))  # a give-up more at every step
    monkeypatch.setattr(train_module, "compile_give_ups", lambda: next(calls))
    plan = training_plan(
        dam_recipe, untied_family, datasets_dir, tmp_path / "out", steps=2, kernels="compiled"
    )
    train_plan(plan, progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "recompile limit" in line]
    assert len(lines) == 1 and "run uncompiled" in lines[0], lines


def _failing_backward_backend():
    """AOTAutograd whose forward compiles (left as traced) and whose backward compiler fails."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backward_compiler(graph, example_inputs):
        raise RuntimeError("backward compiler broke\nsecond line")

    return aot_autograd(
        fw_compiler=lambda graph, example_inputs: make_boxed_func(graph.forward),
        bw_compiler=backward_compiler,
    )


def test_a_layer_whose_backward_cannot_compile_falls_back_before_the_backward(
    untied_family, capsys
):
    """The backward is compiled with the forward, so its failure falls back in the forward
    call (one warning line) instead of breaking the step's ``backward()``: the same gradients."""
    model = build_merged(untied_family)
    params = model.coefficient_parameters()

    def gradients():
        for param in params:
            param.grad = None
        model(IDS).float().square().mean().backward()
        return [param.grad.clone() for param in params]

    expected = gradients()
    try:
        assert kernels.compile_layers(model.model, backend=_failing_backward_backend()) == 2
        compiled = gradients()
    finally:
        torch._dynamo.reset()
        kernels.compile_layers(model.model, enabled=False)
    for got, want in zip(compiled, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "backward compiler broke" in (kernels.fallback_reason() or "")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "backward compiler broke" in lines[0], lines


def test_layers_stay_uncompiled_when_their_stores_are_streamed(
    untied_family, datasets_dir, tmp_path, dam_recipe, capsys
):
    plan = training_plan(
        dam_recipe,
        untied_family,
        datasets_dir,
        tmp_path / "out",
        steps=1,
        kernels="layers",
        offload="layers",
    )
    model, _ = train_plan(plan, progress=False)
    assert all("forward" not in m.__dict__ for m in kernels.decoder_layers(model.model))
    assert type(model.model.lm_head.passes) is CompiledPasses
    assert "does not compile layers under offload: layers" in capsys.readouterr().err

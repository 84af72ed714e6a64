"""The merge module: teachers, one-hot and uniform coefficients, export, tying, granularity."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import dammerge
from dammerge.checkpoint.reader import Checkpoint
from dammerge.config import MergeConfig
from dammerge.learned.export import COEFFICIENTS_FILE, export_merged
from dammerge.learned.layers import MergedLinear
from dammerge.learned.model import MergeOptions, build_merged_model
from dammerge.learned.presets import DAM
from dammerge.learned.settings import parse_settings
from dammerge.testing import make_family

from .helpers import ALL_MERGED, IDS
from .helpers import build_merged as _build


def _logits(path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(IDS).logits


@torch.no_grad()
def _set_coefficients(model, fn) -> None:
    for _, param in model.coefficient_groups():
        param.copy_(fn(param))


@pytest.mark.parametrize("family_name", ["untied_family", "tied_family"])
def test_teacher_mode_reproduces_each_source_exactly(family_name, request):
    family = request.getfixturevalue(family_name)
    model = _build(family)
    for i, source in enumerate(family[1]):
        with torch.no_grad(), model.teacher(i):
            ours = model(IDS)
        torch.testing.assert_close(ours, _logits(source), rtol=0, atol=1e-5)


@pytest.mark.parametrize("parametrization", ["full", "task_vectors"])
def test_one_hot_coefficients_reproduce_a_source(untied_family, parametrization):
    options = MergeOptions(merge_embeddings=True, merge_norms=True, parametrization=parametrization)
    model = _build(untied_family, options)
    for i, source in enumerate(untied_family[1]):

        def one_hot(p, i=i):
            out = torch.zeros_like(p)
            out[i] = 1.0
            return out

        _set_coefficients(model, one_hot)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS), _logits(source), rtol=0, atol=1e-5)


def test_uniform_init_equals_the_linear_merge(untied_family, tmp_path):
    _base, sources = untied_family
    model = _build(untied_family, ALL_MERGED)
    linear = dammerge.merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(s), "parameters": {"weight": 1.0}} for s in sources],
        },
        tmp_path / "linear",
        progress=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), _logits(linear), rtol=0, atol=1e-5)


def test_default_start_differs_from_linear_only_by_base_embeddings(untied_family):
    """Embeddings and norms from the base (the paper's best) unless merging is asked for."""
    model = _build(untied_family)
    base_embedding = Checkpoint(untied_family[0]).get("model.embed_tokens.weight")
    torch.testing.assert_close(
        model.model.model.embed_tokens.inner.weight, base_embedding, rtol=0, atol=0
    )
    names = {name for name, _ in model.coefficient_groups()}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names


def _recipe_and_settings(dam_recipe, family, data, **training):
    cfg = MergeConfig.from_dict(dam_recipe(family[0], family[1], data, **training))
    return cfg, parse_settings(cfg.training, DAM)


@pytest.mark.parametrize(
    ("family_name", "options"),
    [
        ("untied_family", MergeOptions()),
        ("untied_family", MergeOptions(include_base=True, merge_norms=True)),
        ("tied_family", ALL_MERGED),
        ("tied_family", MergeOptions(parametrization="task_vectors", granularity="layer")),
    ],
)
def test_export_reproduces_in_memory_logits(
    family_name, options, request, datasets_dir, tmp_path, dam_recipe
):
    family = request.getfixturevalue(family_name)
    base, sources = family
    model = _build(family, options)
    generator = torch.Generator().manual_seed(0)
    _set_coefficients(
        model, lambda p: p + 0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
    )
    cfg, settings = _recipe_and_settings(dam_recipe, family, datasets_dir)
    out = export_merged(
        model,
        Checkpoint(base),
        [Checkpoint(s) for s in sources],
        tmp_path / "out",
        cfg=cfg,
        settings=settings,
        shard_size=2**30,
        overwrite=False,
        progress=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(_logits(out), model(IDS), rtol=0, atol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tied = family_name == "tied_family"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    if not tied:  # an untied head keeps its own, merged, weight
        assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert "lm_head.weight" in Checkpoint(out).names() or tied
    assert (out / COEFFICIENTS_FILE).is_file() and (out / "tokenizer.json").is_file()


def test_tied_merge_keeps_one_embedding_for_head_and_input(tied_family):
    model = _build(tied_family, ALL_MERGED)
    assert not isinstance(model.model.lm_head, MergedLinear)
    names = {name for name, _ in model.coefficient_groups()}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize(
    ("granularity", "shape"), [("column", (2, 32)), ("layer", (2, 1)), ("model", (2, 1))]
)
def test_granularity_shapes(untied_family, granularity, shape):
    model = _build(untied_family, MergeOptions(granularity=granularity))
    groups = model.coefficient_groups()
    q = dict(groups).get("model.layers.0.self_attn.q_proj.weight")
    if granularity == "model":
        assert [name for name, _ in groups] == ["model"]
        q = groups[0][1]
    assert tuple(q.shape) == shape and q.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for _, p in groups
    )


def test_activation_init_gives_uniform_effective_scales(untied_family):
    for activation in ("tanh", "sigmoid"):
        model = _build(untied_family, MergeOptions(activation=activation))
        for _, coefficients in model.effective_coefficients().items():
            torch.testing.assert_close(coefficients, torch.full_like(coefficients, 0.5))


def test_bf16_store_keeps_float32_coefficients(untied_family):
    model = _build(untied_family, dtype=torch.bfloat16)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.weights.dtype == torch.bfloat16 and layer.coefficients.dtype == torch.float32


def test_biases_are_merged_with_one_coefficient_per_model(tmp_path):
    base, sources = make_family(tmp_path, "qwen2", n=2)  # q/k/v projections carry biases
    model = build_merged_model(Checkpoint(base), [Checkpoint(s) for s in sources])
    q = model.model.model.layers[0].self_attn.q_proj
    assert q.biases is not None and tuple(q.bias_coefficients.shape) == (2,)
    for i, source in enumerate(sources):
        with torch.no_grad(), model.teacher(i):
            torch.testing.assert_close(model(IDS), _logits(source), rtol=0, atol=1e-5)
    expected = (q.biases[0] + q.biases[1]) / 2
    torch.testing.assert_close(q.merged_bias(), expected)


@pytest.mark.parametrize("architecture", ["mistral", "qwen3", "gemma", "phi3"])
def test_other_architectures_teachers_and_uniform_merge(architecture, tmp_path):
    """Gemma (tied, scaled embeddings, 1+w norms), Qwen3 (q/k norms), Phi-3 (fused qkv)."""
    base, sources = make_family(tmp_path, architecture, n=2)
    model = build_merged_model(Checkpoint(base), [Checkpoint(s) for s in sources], ALL_MERGED)
    with torch.no_grad():
        for i, source in enumerate(sources):
            with model.teacher(i):
                torch.testing.assert_close(model(IDS), _logits(source), rtol=0, atol=1e-5)
        linear = dammerge.merge(
            {
                "merge_method": "linear",
                "models": [{"model": str(s), "parameters": {"weight": 1.0}} for s in sources],
            },
            tmp_path / "linear",
            progress=False,
        )
        torch.testing.assert_close(model(IDS), _logits(linear), rtol=0, atol=1e-5)


def _teacher_rows(model, sources: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each source's teacher on its own rows, one forward each (the reference)."""
    rows = ids.shape[0] // len(sources)
    outs = []
    for g, source in enumerate(sources):
        with torch.no_grad(), model.teacher(source):
            part = slice(g * rows, (g + 1) * rows)
            outs.append(model(ids[part], mask[part]))
    return torch.cat(outs)


@pytest.mark.parametrize(
    ("architecture", "tied"),
    [
        ("llama", False),
        ("llama", True),
        ("qwen2", False),
        ("qwen3", False),
        ("gemma", True),
        ("phi3", False),
    ],
)
@pytest.mark.parametrize("sources", [[0, 1], [1, 0], [1, 1, 0]])
def test_batched_teachers_give_each_sources_logits(architecture, tied, sources, tmp_path):
    """All teachers in one forward (``teachers(sources)``: batched products over the stores,
    norms with per-row weights, embeddings per group) against one forward per teacher: biases
    (Qwen2), q/k norms on 4-d inputs (Qwen3), scaled embeddings and 1+w norms with a tied head
    (Gemma), fused qkv (Phi-3); source order reversed (a gathered store) and repeated; right
    padding in one group; two rows per group."""
    base, paths = make_family(tmp_path, architecture, n=2, tie_word_embeddings=tied)
    model = build_merged_model(Checkpoint(base), [Checkpoint(s) for s in paths], ALL_MERGED)
    ids = torch.cat([IDS] * len(sources))  # two rows per group
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # the last group's last row is right-padded
    with torch.no_grad(), model.teachers(sources):
        batched = model(ids, mask)
    torch.testing.assert_close(batched, _teacher_rows(model, sources, ids, mask), rtol=0, atol=1e-5)
    assert all(m.selected is None for _, m in model.merge_modules())  # the mode is left again


def test_batched_teachers_broadcast_norms_and_fall_back_where_they_must(untied_family):
    """Norms take the one-call path with per-row weights (checked against one call per group on
    first use); embeddings, whose weight is a table, take one call per group."""
    model = _build(untied_family, ALL_MERGED)
    with torch.no_grad(), model.teachers([0, 1]):
        model(IDS)
    norm = model.model.model.layers[0].input_layernorm
    assert norm._rows_broadcast is True and model.model.model.norm._rows_broadcast is True
    assert model.model.model.embed_tokens._rows_broadcast is False


def test_batched_teachers_fall_back_for_a_module_that_checks_shapes():
    """A LayerNorm (``layer_norm`` rejects per-row weights) runs once per group instead, with
    the same result; rows that do not split into equal groups are refused."""
    from dammerge.learned.layers import CoefficientScheme, MergedParameterModule, RowGroups

    torch.manual_seed(0)
    stacks = {"weight": torch.randn(2, 6), "bias": torch.randn(2, 6)}
    module = MergedParameterModule(torch.nn.LayerNorm(6), stacks, CoefficientScheme(2), None)
    x = torch.randn(4, 3, 6)
    module.selected = RowGroups((1, 0))
    got = module(x)
    assert module._rows_broadcast is False
    expected = [
        torch.nn.functional.layer_norm(
            x[2 * g : 2 * g + 2], (6,), stacks["weight"][s], stacks["bias"][s]
        )
        for g, s in enumerate((1, 0))
    ]
    torch.testing.assert_close(got, torch.cat(expected))
    with pytest.raises(ValueError, match="equal groups"):
        module(torch.randn(3, 3, 6))


class _SummedScale(torch.nn.Module):
    """Scales by the sum of its weight: per-row weights raise nothing, but sum over all rows."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()


def test_batched_teachers_catch_a_module_that_misuses_per_row_weights():
    """Broadcasting runs without an error here and computes the wrong thing: the first-use
    check against one call per group catches it, and the module runs once per group."""
    from dammerge.learned.layers import CoefficientScheme, MergedParameterModule, RowGroups

    torch.manual_seed(0)
    stacks = {"weight": torch.randn(2, 6)}
    module = MergedParameterModule(_SummedScale(), stacks, CoefficientScheme(2), None)
    module.selected = RowGroups((0, 1))
    x = torch.randn(4, 3, 6)
    expected = torch.cat([x[:2] * stacks["weight"][0].sum(), x[2:] * stacks["weight"][1].sum()])
    for _ in range(2):  # the check's verdict, then its memory of it
        torch.testing.assert_close(module(x), expected)
        assert module._rows_broadcast is False


def test_batched_teachers_refuse_unknown_sources(untied_family):
    model = _build(untied_family)
    with pytest.raises(IndexError, match="out of range"), model.teachers([0, 2]):
        pass
    with pytest.raises(ValueError, match="no teachers"), model.teachers([]):
        pass

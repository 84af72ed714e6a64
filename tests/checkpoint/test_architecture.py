"""Tensor classification as data, checked against the modules transformers itself builds."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from dammerge.checkpoint.architecture import Architecture, TensorKind
from dammerge.checkpoint.reader import Checkpoint
from dammerge.testing import TINY_CONFIGS, VOCAB, make_tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")


def expected_kinds(model: torch.nn.Module) -> dict[str, tuple[TensorKind, int | None, int | None]]:
    """(kind, layer, input_dim) of every parameter, read from the module that owns it."""
    expected = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            layer_match = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
            layer = int(layer_match.group(1)) if layer_match else None
            if module_name == "lm_head":
                expected[name] = (TensorKind.LM_HEAD, None, 1)
            elif isinstance(module, torch.nn.Embedding):
                expected[name] = (TensorKind.EMBEDDING, None, None)
            elif "norm" in type(module).__name__.lower():
                expected[name] = (TensorKind.NORM, layer, None)
            elif param_name == "bias":
                expected[name] = (TensorKind.BIAS, layer, None)
            elif isinstance(module, Conv1D):
                assert param.shape[0] == module.nx  # (in, out): inputs on dim 0
                expected[name] = (TensorKind.LINEAR, layer, 0)
            elif isinstance(module, torch.nn.Linear):
                assert param.shape[1] == module.in_features
                expected[name] = (TensorKind.LINEAR, layer, 1)
            else:
                raise AssertionError(f"unexpected parameter {name} of {type(module).__name__}")
    return expected


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_is_classified_like_its_module(arch):
    config = AutoConfig.for_model(arch, **TINY_CONFIGS[arch], vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_config(config)
    architecture = Architecture.from_config(config.to_dict())
    assert architecture.spec.model_types and arch in architecture.spec.model_types
    expected = expected_kinds(model)
    assert expected, arch
    kinds = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        info = architecture.classify(name, param.dim())
        assert (info.kind, info.layer, info.input_dim) == expected[name], name
        kinds.add(info.kind)
    assert {TensorKind.EMBEDDING, TensorKind.NORM, TensorKind.LINEAR} <= kinds
    assert architecture.num_layers == 2 if arch != "llama" else 3


@pytest.mark.parametrize("arch", ARCHS)
def test_vocabulary_tensors_are_the_input_and_output_embeddings(arch):
    """The tensors with one row per token are the ones transformers resizes with the vocabulary
    (GPT-2's position embedding ``wpe`` is an embedding, not one of them)."""
    config = AutoConfig.for_model(arch, **TINY_CONFIGS[arch], vocab_size=VOCAB)
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config)
    architecture = Architecture.from_config(config.to_dict())
    token_indexed = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    for name, param in model.named_parameters():
        assert architecture.is_vocabulary(name) == any(param is p for p in token_indexed), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
def test_tie_word_embeddings_is_read_from_the_config(arch, tie):
    config = AutoConfig.for_model(
        arch, **TINY_CONFIGS[arch], vocab_size=VOCAB, tie_word_embeddings=tie
    )
    assert Architecture.from_config(config.to_dict()).tie_word_embeddings is tie


@pytest.mark.parametrize(("arch", "default"), [("llama", False), ("gemma", True), ("gpt2", True)])
def test_tie_default_when_the_config_is_silent(arch, default):
    assert Architecture.from_config({"model_type": arch}).tie_word_embeddings is default


@pytest.mark.parametrize("tie", [True, False])
def test_saved_checkpoint_respects_tying(tmp_path, tie):
    folder = make_tiny_model(tmp_path / "m", "llama", tie_word_embeddings=tie)
    ck = Checkpoint(folder)
    assert ck.architecture.tie_word_embeddings is tie
    assert ("lm_head.weight" in ck) is not tie  # a tied head is not stored separately


def test_unknown_architecture_falls_back_to_name_patterns_and_says_so():
    with pytest.warns(UserWarning, match="not known to dammerge"):
        architecture = Architecture.from_config({"model_type": "mamba9", "num_hidden_layers": 4})
    classify = architecture.classify
    assert classify("backbone.layers.2.mixer.in_proj.weight", 2).kind is TensorKind.LINEAR
    assert classify("backbone.layers.2.mixer.in_proj.weight", 2).layer == 2
    assert classify("backbone.layers.2.norm.weight", 1).kind is TensorKind.NORM
    assert classify("backbone.embeddings.weight", 2).kind is TensorKind.EMBEDDING
    assert classify("lm_head.weight", 2).kind is TensorKind.LM_HEAD
    assert classify("backbone.layers.2.mixer.in_proj.bias", 1).kind is TensorKind.BIAS
    assert classify("backbone.layers.1.mixer.A_log", 2).kind is TensorKind.OTHER


def test_known_architectures_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for arch in ARCHS:
            Architecture.from_config({"model_type": arch})


def test_depth_fraction():
    architecture = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 5})
    depth = architecture.depth_fraction
    classify = architecture.classify
    assert depth(classify("model.layers.0.mlp.up_proj.weight", 2)) == 0.0
    assert depth(classify("model.layers.3.mlp.up_proj.weight", 2)) == pytest.approx(0.75)
    assert depth(classify("model.layers.4.input_layernorm.weight", 1)) == 1.0
    assert depth(classify("model.embed_tokens.weight", 2)) == 0.0
    single = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 1})
    # one block: mergekit places it at t = 1
    assert single.depth_fraction(single.classify("model.layers.0.mlp.up_proj.weight", 2)) == 1.0


def test_layer_count_keys():
    assert Architecture.from_config({"model_type": "gpt2", "n_layer": 7}).num_layers == 7
    nested = {"model_type": "gemma3_text", "text_config": {"num_hidden_layers": 9}}
    assert Architecture.from_config(nested).num_layers == 9

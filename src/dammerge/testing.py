"""Tiny random-init checkpoints of real architectures, for tests, the demo and benchmarks.

Each is an ordinary Hugging Face folder (config.json + safetensors + tokenizer) built with
``transformers`` itself, so whatever loads them loads a user's 7B checkpoints too. Fine-tuned
"variants" are made by adding seeded noise to every float tensor of a base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 128

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "mistral": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "qwen2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "qwen3": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    },
    "gemma": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    },
    "phi3": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
    },
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (no training, no download)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def make_tiny_model(
    folder: str | Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool | None = None,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a random-init model of ``model_type`` with a tokenizer into ``folder``."""
    # special-token ids inside the tiny vocabulary (the library defaults, e.g. 32000 or 50256,
    # point outside it and make transformers warn and generation misbehave)
    kwargs = dict(TINY_CONFIGS[model_type], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_word_embeddings
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    folder = Path(folder)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **save_kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_variant(base: str | Path, folder: str | Path, *, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tune' of ``base``: every float tensor plus seeded Gaussian noise."""
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.add_(noise.to(param.dtype))
    folder = Path(folder)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_family(folder: str | Path, model_type: str = "llama", n: int = 3, **kwargs: Any):
    """A base and ``n`` variants of it under ``folder``; returns (base, [variants])."""
    folder = Path(folder)
    base = make_tiny_model(folder / "base", model_type, **kwargs)
    variants = [make_variant(base, folder / f"ft{i}", seed=100 + i) for i in range(n)]
    return base, variants


def make_lora_adapter(
    base: str | Path,
    folder: str | Path,
    *,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.1,
    safe_serialization: bool = True,
    **lora_config: Any,
) -> Path:
    """A PEFT LoRA adapter of ``base`` saved by peft itself into ``folder``, its factors A and B
    both seeded Gaussian noise (peft initialises B to zero, which would make the update
    vanish); ``lora_config`` goes to ``peft.LoraConfig`` (``r``, ``lora_alpha``,
    ``use_rslora``, ``modules_to_save``, ...)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(target_modules=list(target_modules), **lora_config)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(noise.to(param.dtype))
    folder = Path(folder)
    peft_model.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def make_tiny_llava(folder: str | Path, seed: int = 0) -> str:
    """A random-init LLaVA checkpoint: a CLIP vision tower, whose patch embedding is a 4-D
    convolution kernel (32 output channels), a projector and a Llama language model."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=32,
        intermediate_size=48,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=1,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)

"""Checking and loading the models to evaluate: any Hugging Face causal-LM folder with a tokenizer.

:func:`check_model_dir` runs for every model before anything is generated, so a typo in the
fifth path fails in a second with one line instead of after the first four evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dammerge.data.tokenizer import load_tokenizer
from dammerge.devices import resolve_device
from dammerge.errors import DammergeError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HINT = "pass a Hugging Face model folder (config.json, weights, tokenizer files)"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise DammergeError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)}") from None


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DammergeError(f"{path} is not a model folder (no config.json)", HINT)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DammergeError(f"cannot read {config_file}: {exc}", HINT) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise DammergeError(f"{config_file} names no model_type", HINT)
    return config


def _check_causal_lm(path: Path, config: dict[str, Any]) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config["model_type"] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DammergeError(
            f"{path} holds a {config['model_type']!r} model, not a causal language model",
            "evaluation generates text: pass a causal LM (Llama, Mistral, Qwen, GPT-2...)",
        )


def check_model_dir(path: str | Path) -> Path:
    """Fail with one line unless ``path`` is a loadable causal-LM folder with a tokenizer."""
    path = Path(path)
    if not path.exists():
        raise DammergeError(f"{path} does not exist", HINT)
    if not path.is_dir():
        raise DammergeError(f"{path} is not a folder", HINT)
    config = _read_config(path)
    _check_causal_lm(path, config)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise DammergeError(f"{path} holds no weights ({' or '.join(WEIGHT_FILES[:2])})", HINT)
    load_tokenizer(path, require_eos=True)
    return path


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` ready for evaluation: eval mode, on ``device``, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, require_eos=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DammergeError(f"cannot load the model in {path}: {first_line}", HINT) from None
    return model.to(resolve_device(str(device))).eval(), tokenizer

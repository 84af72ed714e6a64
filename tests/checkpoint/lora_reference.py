"""The reference a ``base+adapter`` reference is checked against: peft's own merge."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dammerge.testing import tiny_tokenizer


def fold_with_peft(base: Path, adapter: Path, folder: Path) -> Path:
    """The reference: peft merges the adapter into the base and transformers saves it."""
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def assert_identical(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    differing = [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:4]}"

"""Loading a model folder's tokenizer, with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dammerge.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HINT = "the folder needs its tokenizer files (copy the base model's tokenizer in)"


def load_tokenizer(folder: str | Path, *, require_eos: bool = False) -> Any:
    """The tokenizer of a model folder.

    ``require_eos``: refuse a tokenizer without an EOS token (a scored response must be able
    to end).
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer files", HINT)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {reason}", HINT) from None
    if require_eos:
        eos_token_id(tokenizer)
    return tokenizer


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id; a tokenizer without one cannot mark a response end."""
    if tokenizer.eos_token_id is None:
        raise CheckpointError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no EOS token",
            "set eos_token in its tokenizer_config.json",
        )
    return int(tokenizer.eos_token_id)

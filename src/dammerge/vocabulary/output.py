"""Writing the merged model's tokenizer files."""

from __future__ import annotations

from pathlib import Path

from dammerge.checkpoint.writer import CheckpointWriter
from dammerge.data.tokenizer import load_tokenizer
from dammerge.vocabulary.build import OutputVocabulary


def write_tokenizer(
    writer: CheckpointWriter,
    folder: Path,
    vocabulary: OutputVocabulary | None = None,
    chat_template: str | None = None,
) -> None:
    """The tokenizer of ``folder`` copied unchanged, or, when the merge added tokens to it or
    sets its chat template, saved again by transformers with them."""
    changed = vocabulary is not None and bool(vocabulary.added)
    if not changed and chat_template is None:
        writer.copy_tokenizer(folder)
        return
    tokenizer = vocabulary.tokenizer if vocabulary is not None else load_tokenizer(folder)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    writer.save_tokenizer(tokenizer)

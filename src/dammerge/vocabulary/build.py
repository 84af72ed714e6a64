"""The output vocabulary: which tokenizer the merge writes, and each model's ids in it.

Built as mergekit 0.1.5 builds it:

- ``base``: the tokenizer of the base model (the first model without one);
- a model folder: that folder's tokenizer;
- ``union``: the base's tokenizer plus every token some other model has and the base lacks,
  appended as added tokens, new ids after the base's: first the tokens of the models' own
  vocabularies, then their added tokens (the first model to define an added token gives its
  settings: special, normalized, ...). Models are taken in the recipe's order, each one's tokens
  by id. (mergekit takes the models from a set and the vocabulary tokens in hash order, so its
  new ids may come in another order from run to run; the token set and each token's rows agree.)

Then each token of ``tokens:`` the result still lacks is added. A model's token whose id is at
or past its embedding's rows is ignored, as mergekit ignores ids past ``vocab_size``. A model
without tokenizer files is taken to use the base's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.checkpoint.reader import Checkpoint
from dammerge.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from dammerge.errors import CheckpointError, ConfigError
from dammerge.vocabulary.settings import TokenizerSettings


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def vocabulary_rows(ck: Checkpoint) -> int:
    """How many token rows a model's embedding holds (its config's ``vocab_size`` when no
    tensor is named as a vocabulary tensor)."""
    for name in ck.names():
        if ck.architecture.is_vocabulary(name):
            return ck.shape(name)[0]
    size = ck.config.get("vocab_size") or (ck.config.get("text_config") or {}).get("vocab_size")
    if not isinstance(size, int):
        raise CheckpointError(
            f"{ck.path}: cannot tell its vocabulary size (no embedding tensor, no vocab_size)",
            "merging tokenizers needs models with an input embedding",
        )
    return size


@dataclass(frozen=True)
class ModelVocabulary:
    """One input model's tokens: ``ids`` maps each token to its row, ``added`` its added
    tokens (content to transformers ``AddedToken``) in id order; ``rows`` its embedding rows."""

    path: Path
    ids: dict[str, int]
    added: dict[str, Any]
    rows: int

    @classmethod
    def of(cls, ck: Checkpoint, tokenizer: Any) -> ModelVocabulary:
        decoder = tokenizer.added_tokens_decoder
        added = {decoder[i].content: decoder[i] for i in sorted(decoder)}
        return cls(ck.path, dict(tokenizer.get_vocab()), added, vocabulary_rows(ck))

    def has(self, token: str, rows: int | None = None) -> bool:
        """Whether the model has ``token`` within its first ``rows`` rows (all by default)."""
        index = self.ids.get(token)
        return index is not None and index < (self.rows if rows is None else rows)

    def permutation(self, tokens: list[str], rows: int) -> torch.Tensor:
        """For each output id, this model's row for that token, -1 where it lacks it (or its
        id is at or past ``rows``, the rows of the tensor being aligned)."""
        found = [self.ids.get(token, -1) for token in tokens]
        return torch.tensor([i if i < rows else -1 for i in found], dtype=torch.long)

    def ordered_tokens(self) -> list[str]:
        """Its tokens within its rows, by id."""
        return [t for t, i in sorted(self.ids.items(), key=lambda kv: kv[1]) if i < self.rows]


@dataclass
class OutputVocabulary:
    """The merged model's tokenizer and vocabulary.

    ``tokens[i]`` is the token of output id ``i``; ``padded_size`` the output's embedding rows
    (``len(tokens)`` rounded up to ``pad_to_multiple_of``); ``added`` the tokens appended to the
    source tokenizer (none: its files are copied unchanged from ``source_folder``).
    """

    settings: TokenizerSettings
    tokenizer: Any
    source_folder: Path
    tokens: list[str]
    padded_size: int
    models: dict[Path, ModelVocabulary]
    added: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def forced(self) -> set[str]:
        return {t for t, entry in (self.settings.tokens or {}).items() if entry.force}

    def ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}


def build_vocabulary(
    settings: TokenizerSettings, base: Checkpoint, models: Iterable[Checkpoint]
) -> OutputVocabulary:
    """The output vocabulary of a merge whose tokenizer base is ``base`` and whose inputs are
    ``models`` (in the recipe's order; ``base`` may be among them)."""
    if not has_tokenizer(base.folder):
        raise CheckpointError(
            f"{base.path} has no tokenizer files: the merged vocabulary starts from its tokenizer",
            "copy the base model's tokenizer files into its folder",
        )
    base_tokenizer = load_tokenizer(base.folder)
    ordered = {base.path: base, **{ck.path: ck for ck in models}}
    vocabularies = {}
    for path, ck in ordered.items():  # keyed by identity; tokenizers read from each folder
        own = has_tokenizer(ck.folder) and ck.folder != base.folder
        tokenizer = load_tokenizer(ck.folder) if own else base_tokenizer
        vocabularies[path] = ModelVocabulary.of(ck, tokenizer)
    tokenizer, folder = _source_tokenizer(settings, base, vocabularies[base.path])
    added = []
    if settings.source == "union":
        added = _add_union_tokens(tokenizer, list(vocabularies.values()))
    existing = tokenizer.get_vocab()
    wanted = [token for token in settings.tokens or {} if token not in existing]
    if wanted:
        tokenizer.add_tokens(wanted)
        added.extend(wanted)
    tokens = _tokens_by_id(tokenizer, folder)
    multiple = settings.pad_to_multiple_of or 1
    padded = -(-len(tokens) // multiple) * multiple
    return OutputVocabulary(settings, tokenizer, folder, tokens, padded, vocabularies, added)


def _source_tokenizer(
    settings: TokenizerSettings, base: Checkpoint, base_vocabulary: ModelVocabulary
) -> tuple[Any, Path]:
    """A fresh (mutable) copy of the tokenizer the output starts from, and its folder."""
    if settings.source in ("base", "union"):
        beyond = [t for t, i in base_vocabulary.ids.items() if i >= base_vocabulary.rows]
        if beyond:
            raise CheckpointError(
                f"the tokenizer of {base.path} has {len(beyond)} token(s) past its embedding's "
                f"{base_vocabulary.rows} rows (e.g. {beyond[0]!r})",
                "remove those tokens from its tokenizer, or resize its embedding",
            )
        return load_tokenizer(base.folder), base.folder
    folder = Path(settings.source)
    if not has_tokenizer(folder):
        raise ConfigError(f"tokenizer source {folder} holds no tokenizer files")
    return load_tokenizer(folder), folder


def _add_union_tokens(tokenizer: Any, vocabularies: list[ModelVocabulary]) -> list[str]:
    """Append to ``tokenizer`` the tokens of the other models it lacks; returns them."""
    existing = set(tokenizer.get_vocab())
    added_settings: dict[str, Any] = {}
    for vocabulary in vocabularies:
        for token, info in vocabulary.added.items():
            if vocabulary.has(token):
                added_settings.setdefault(token, info)
    plain = []
    for vocabulary in vocabularies:
        for token in vocabulary.ordered_tokens():
            if token not in existing and token not in added_settings:
                plain.append(token)
                existing.add(token)
    if plain:
        tokenizer.add_tokens(plain)
    new_added = [t for t in added_settings if t not in existing]
    # every added token is registered (one the output has as a plain token keeps its id and
    # becomes an added token), as mergekit registers them
    tokenizer.add_tokens(list(added_settings.values()))
    return plain + new_added


def _tokens_by_id(tokenizer: Any, folder: Path) -> list[str]:
    """The output's tokens in id order; its ids must run from 0 without gaps."""
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * len(vocab)
    for token, index in vocab.items():
        if not 0 <= index < len(vocab) or tokens[index] is not None:
            raise CheckpointError(
                f"the tokenizer from {folder} gives {token!r} id {index}, but its "
                f"{len(vocab)} tokens do not have one id each from 0 to {len(vocab) - 1}",
                "use a tokenizer whose ids run from 0 without gaps",
            )
        tokens[index] = token
    return [t for t in tokens if t is not None]

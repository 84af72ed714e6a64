"""Embedding and output-head rows in the output vocabulary, as mergekit 0.1.5 builds them.

Each input of a vocabulary tensor (``embed_tokens``, ``lm_head``: one row per token id) is
rebuilt with the output's rows before the merge method sees it:

- a token the model has (within that tensor's rows) and which is not forced: its own row;
- otherwise the token's fill row, the same for every input that lacks it:
  - a ``tokens:`` entry with a source: zeros, the source model's row for the token, or the
    source model's row for another token (``model_token``);
  - else the row of the only input that has the token; zeros when none has it; the base's row
    when the base is an input and has it; otherwise the mean of the rows of the inputs that
    have it (summed in input order, then divided);
- rows past the vocabulary (``pad_to_multiple_of``): the mean of the input's rebuilt rows.

The merge method then merges the rebuilt inputs as it merges any tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dammerge.errors import ConfigError
from dammerge.vocabulary.build import OutputVocabulary
from dammerge.vocabulary.settings import ModelTokenEmbedding, ZeroEmbedding, reference_key


@dataclass(frozen=True)
class FillSource:
    """Where a configured token's fill row comes from: zeros (``model`` None), ``model``'s
    row for the token itself (``row`` None), or ``model``'s row ``row``."""

    model: Path | None
    row: int | None = None


def resolve_fill_sources(
    vocabulary: OutputVocabulary, recipe_models: dict[str, Path]
) -> dict[str, FillSource]:
    """The ``tokens:`` entries with a source, checked against the recipe's models:
    ``recipe_models`` maps each model reference of the recipe (as :func:`reference_key` writes
    it) to its checkpoint folder."""
    fills = {}
    for token, entry in (vocabulary.settings.tokens or {}).items():
        where = f"tokenizer.tokens[{token!r}].source"
        source = entry.source
        if source is None:
            continue
        if isinstance(source, ZeroEmbedding):
            fills[token] = FillSource(None)
            continue
        reference = source.model if isinstance(source, ModelTokenEmbedding) else source
        path = recipe_models.get(reference_key(reference))
        if path is None:
            raise ConfigError(
                f"{where} names {reference}, which the recipe does not merge",
                "take rows from one of the recipe's models, or use {kind: zero}",
            )
        model = vocabulary.models[path]
        if isinstance(source, ModelTokenEmbedding):
            row = source.token_id
            if source.token is not None:
                if not model.has(source.token):
                    raise ConfigError(
                        f"{where}: {path.name} has no token {source.token!r}",
                        "name a token of that model's tokenizer, or give its token_id",
                    )
                row = model.ids[source.token]
            assert row is not None
            if not 0 <= row < model.rows:
                raise ConfigError(
                    f"{where}: token_id {row} is outside {path.name}'s {model.rows} rows",
                    f"use an id from 0 to {model.rows - 1}",
                )
            fills[token] = FillSource(path, row)
        else:
            if not model.has(token):
                raise ConfigError(
                    f"{where}: {path.name} has no token {token!r} to copy",
                    f"copy another token's row with {{kind: model_token, model: {reference}, "
                    "token: ...}, or use {kind: zero}",
                )
            fills[token] = FillSource(path)
    return fills


@dataclass(frozen=True)
class RowAlignment:
    """How each input of one vocabulary tensor becomes a tensor with the output's rows.

    ``own[k, i]`` is input ``k``'s row for output id ``i`` (-1: it takes the fill row);
    ``fill_ids`` the output ids with a fill row; ``fill_from[k, d]`` the row input ``k`` gives
    to the fill row of ``fill_ids[d]`` (-1: none; several: their mean; none at all: zeros).
    """

    own: torch.Tensor
    fill_ids: torch.Tensor
    fill_from: torch.Tensor
    size: int
    padded_size: int

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs (in the tensor's source order) rebuilt with the output's rows."""
        device = tensors[0].device
        own, fill_ids = self.own.to(device), self.fill_ids.to(device)
        fill = self._fill_rows(tensors)
        rebuilt = []
        for k, tensor in enumerate(tensors):
            new = tensor.new_empty((self.padded_size, *tensor.shape[1:]))
            body = new[: self.size]
            body[fill_ids] = fill
            mine = own[k] >= 0
            body[mine] = tensor[own[k][mine]]
            if self.padded_size > self.size:
                new[self.size :] = body.mean(dim=0)
            rebuilt.append(new)
        return rebuilt

    def _fill_rows(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        device = tensors[0].device
        fill_from = self.fill_from.to(device)
        count = (fill_from >= 0).sum(dim=0)
        fill = tensors[0].new_zeros((len(self.fill_ids), *tensors[0].shape[1:]))
        single = count == 1
        for k, tensor in enumerate(tensors):
            rows = fill_from[k]
            one = (rows >= 0) & single
            fill[one] = tensor[rows[one]]
            many = (rows >= 0) & ~single
            if many.any():
                fill[many] += tensor[rows[many]]
        many = count > 1
        if many.any():
            shape = (-1, *([1] * (fill.dim() - 1)))
            fill[many] /= count[many].to(fill.dtype).view(shape)
        return fill


def plan_rows(
    vocabulary: OutputVocabulary,
    fills: dict[str, FillSource],
    inputs: list[tuple[Path, int]],
    base: Path | None,
    tensor: str,
) -> RowAlignment | None:
    """The row alignment of vocabulary tensor ``tensor`` whose inputs are ``inputs`` (model
    folder, rows of its tensor), in source order; ``base`` is the recipe's base model. None
    when every input already has the output's rows in the output's order."""
    size, padded = vocabulary.size, vocabulary.padded_size
    perms = torch.stack(
        [vocabulary.models[path].permutation(vocabulary.tokens, rows) for path, rows in inputs]
    )
    ids = vocabulary.ids()
    forced = torch.zeros(size, dtype=torch.bool)
    forced[[ids[t] for t in vocabulary.forced]] = True
    if (
        not forced.any()
        and all(rows == padded for _, rows in inputs)
        and bool((perms == torch.arange(size)).all())
    ):
        return None
    present = perms >= 0
    fill_ids = ((~present).any(dim=0) | forced).nonzero().flatten()
    fill_from = _automatic_fills(perms[:, fill_ids], [path for path, _ in inputs], base)
    position = {int(i): d for d, i in enumerate(fill_ids)}
    for token, source in fills.items():
        d = position.get(ids[token])
        if d is not None:
            fill_from[:, d] = _configured_fill(token, source, perms[:, ids[token]], inputs, tensor)
    own = torch.where(present & ~forced, perms, -1)
    return RowAlignment(own, fill_ids, fill_from, size, padded)


def _automatic_fills(perms: torch.Tensor, paths: list[Path], base: Path | None) -> torch.Tensor:
    """Fill rows without a configured source: every input that has the token contributes
    (one: its row; none: zeros), except that the base alone gives it when it is an input
    that has it and others have it too."""
    present = perms >= 0
    fill_from = torch.where(present, perms, -1)
    if base in paths:
        b = paths.index(base)
        from_base = present[b] & (present.sum(dim=0) > 1)
        fill_from[:, from_base] = -1
        fill_from[b, from_base] = perms[b, from_base]
    return fill_from


def _configured_fill(
    token: str,
    source: FillSource,
    rows: torch.Tensor,
    inputs: list[tuple[Path, int]],
    tensor: str,
) -> torch.Tensor:
    """The ``fill_from`` column of a token with a configured source (``rows``: each input's
    row for the token)."""
    column = torch.full((len(inputs),), -1, dtype=torch.long)
    if source.model is None:
        return column
    paths = [path for path, _ in inputs]
    if source.model not in paths:
        raise ConfigError(
            f"tokenizer.tokens[{token!r}] takes its rows from {source.model.name}, which "
            f"{tensor} is not merged from",
            f"take them from one of {', '.join(p.name for p in paths)}",
        )
    k = paths.index(source.model)
    row = int(rows[k]) if source.row is None else source.row
    if not 0 <= row < inputs[k][1]:
        raise ConfigError(
            f"tokenizer.tokens[{token!r}]: {source.model.name}'s {tensor} has no row for it",
            "take the rows from another model, or use {kind: zero}",
        )
    column[k] = row
    return column

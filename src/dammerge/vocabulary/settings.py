"""The recipe's ``tokenizer:`` block, as mergekit 0.1.5 reads it.

```yaml
tokenizer:
  source: union               # union | base | a model folder
  tokens:
    <|im_start|>:
      source: ./chat-model    # copy this model's row for the token
    <|im_end|>:
      source: {kind: model_token, model: ./chat-model, token: </s>}
      force: true             # every model's row, not only the models that lack it
    <pad>:
      source: {kind: zero}
  pad_to_multiple_of: 64
```

The older ``tokenizer_source: union`` (or ``base``, or a folder) is the same block without
``tokens`` and ``pad_to_multiple_of``: :func:`tokenizer_settings` reads either form.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

KEYWORDS = ("union", "base")


class ZeroEmbedding(BaseModel):
    """``{kind: zero}``: the token's rows are zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """``{kind: model_token, model: X, token: T}`` (or ``token_id: N``): the token's rows are
    model X's rows for token T (or row N), e.g. a new ``<|im_end|>`` started from ``</s>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


TokenSource = ZeroEmbedding | ModelTokenEmbedding | str
SOURCE_KINDS: dict[str, type[BaseModel]] = {
    "zero": ZeroEmbedding,
    "model_token": ModelTokenEmbedding,
}


class TokenSettings(BaseModel):
    """One entry of ``tokens``: where the token's rows come from for the models that lack it
    (every model with ``force``). Without ``source`` the usual rule applies (see
    :mod:`dammerge.vocabulary.rows`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: TokenSource | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source_by_kind(cls, value: Any) -> Any:
        """A mapping is read by its ``kind``, so a mistake names that kind's own fields."""
        if value is None or isinstance(value, str | ZeroEmbedding | ModelTokenEmbedding):
            return value
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind not in SOURCE_KINDS:
            raise ValueError(
                "a token source is a model folder, {kind: zero} or {kind: model_token, model: "
                f"..., token: ...}}, got {value!r}"
            )
        try:
            return SOURCE_KINDS[kind].model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ValueError(f"{kind} source: {field + ': ' if field else ''}{message}") from None

    @model_validator(mode="after")
    def _force_needs_source(self) -> TokenSettings:
        if self.force and self.source is None:
            raise ValueError("'force: true' needs a 'source' to take the token's rows from")
        return self

    def source_model(self) -> str | None:
        """The model folder the rows are read from (None for zeros or no source)."""
        if isinstance(self.source, ModelTokenEmbedding):
            return self.source.model
        return self.source if isinstance(self.source, str) else None


class TokenizerSettings(BaseModel):
    """The whole ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "union"
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)

    def with_paths(self, fix: Callable[[str], str]) -> TokenizerSettings:
        """This block with every model folder passed through ``fix`` (the recipe's folder)."""

        def fixed_token(entry: TokenSettings) -> TokenSettings:
            source = entry.source
            if isinstance(source, ModelTokenEmbedding):
                source = source.model_copy(update={"model": fix(source.model)})
            elif isinstance(source, str):
                source = fix(source)
            return entry.model_copy(update={"source": source})

        tokens = None
        if self.tokens is not None:
            tokens = {token: fixed_token(entry) for token, entry in self.tokens.items()}
        source = self.source if self.source in KEYWORDS else fix(self.source)
        return self.model_copy(update={"source": source, "tokens": tokens})

    def token_models(self) -> dict[str, str]:
        """Each configured token whose rows come from a model, with that model's folder."""
        models = {}
        for token, entry in (self.tokens or {}).items():
            model = entry.source_model()
            if model is not None:
                models[token] = model
        return models


def reference_key(reference: str) -> str:
    """A model reference as an absolute, normalised path string, to compare references."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(reference)))


def tokenizer_settings(
    block: TokenizerSettings | None, tokenizer_source: str | None
) -> TokenizerSettings | None:
    """The recipe's vocabulary settings from either form, None when it sets neither (the
    output then keeps the reference model's tokenizer and rows, copied unchanged)."""
    if block is not None:
        return block
    if tokenizer_source is not None:
        return TokenizerSettings(source=tokenizer_source)
    return None

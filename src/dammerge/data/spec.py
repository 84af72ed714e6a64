"""The ``dataset:`` block of a recipe's model: where its representative data is and how to read it.

```yaml
models:
  - model: ./math
    dataset:
      path: data/math.jsonl        # JSONL, JSON, CSV, Parquet, or a save_to_disk folder
      template: alpaca             # alpaca | chat | raw
      fields: {instruction: question, output: answer}   # our field -> the dataset's column
      samples: 256                 # a seeded random subset (default: what the method uses)
      split: train                 # for a saved DatasetDict
```

The block means the same to every method that reads one (DAM and AdaMerging, evolutionary
search): the same formats, templates, field names and defaults. Unknown keys are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dammerge.errors import ConfigError

TEMPLATES = ("alpaca", "chat", "raw")
# The fields each template reads; 'input' is optional unless the recipe maps it explicitly.
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("instruction", "input", "output"),
    "raw": ("text",),
}
OPTIONAL_FIELDS = frozenset({"input"})


class DatasetSpec(BaseModel):
    """One model's representative data."""

    model_config = ConfigDict(extra="forbid")

    path: str
    fields: dict[str, str] = Field(default_factory=dict)  # our name -> the dataset's column
    template: Literal["alpaca", "chat", "raw"] = "alpaca"
    samples: int | None = Field(default=None, gt=0)
    split: str = "train"  # for a saved DatasetDict

    @model_validator(mode="after")
    def _known_fields(self) -> DatasetSpec:
        allowed = FIELDS[self.template]
        for key in self.fields:
            if key not in allowed:
                raise ValueError(
                    f"unknown field {key!r} for template {self.template} (map {', '.join(allowed)})"
                )
        return self

    def column(self, field: str) -> str:
        """The dataset column that holds ``field``."""
        return self.fields.get(field, field)

    def required_fields(self) -> list[str]:
        """Fields every record must have a text for (the template's, less the optional ones)."""
        return [field for field in FIELDS[self.template] if field not in OPTIONAL_FIELDS]


def require_dataset(model: str, dataset: DatasetSpec | None, needed_by: str) -> DatasetSpec:
    """``dataset``, or a one-line error saying that ``needed_by`` needs one for ``model``."""
    if dataset is None:
        raise ConfigError(
            f"model {model} has no dataset, which {needed_by} needs",
            "add dataset: {path: FILE.jsonl} under every model of the recipe",
        )
    return dataset

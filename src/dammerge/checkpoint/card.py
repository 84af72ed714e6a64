"""The model card (``README.md``) written beside every merged checkpoint.

The metadata block is built with ``huggingface_hub``'s :class:`ModelCardData`, so the Hub (and
anything that reads cards with ``huggingface_hub``) sees what the model is: ``base_model`` lists
the models merged (the base first), ``base_model_relation: merge``, ``library_name:
transformers``, tags ``merge``, ``dammerge`` and the method, and the base model's license when
its own card states one. The body says how the model was made and holds the recipe, with its
paths relative to the card's folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from dammerge import __version__

# A model downloaded with huggingface_hub lives in .../models--ORG--NAME/snapshots/REVISION.
HUB_CACHE_FOLDER = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
LICENSE_KEYS = ("license", "license_name", "license_link")


def reference_folders(path: str | Path) -> list[Path]:
    """The folders a model reference names: itself, or the base and the adapter of a
    ``BASE+ADAPTER`` reference (a LoRA applied to its base)."""
    text = str(path)
    if "+" in text and not Path(text).exists():
        base, _, adapter = text.partition("+")
        return [Path(base), Path(adapter)]
    return [Path(text)]


def model_name(path: str | Path) -> str:
    """The name a card gives a source model: its Hub id for a model in the Hub's cache
    (``models--ORG--NAME/snapshots/REV``), else its folder's name; ``BASE+ADAPTER`` for a
    LoRA reference."""
    return "+".join(_folder_name(folder) for folder in reference_folders(path))


def _folder_name(path: Path) -> str:
    for part in (path, *path.parents):
        match = HUB_CACHE_FOLDER.match(part.name)
        if match:
            return f"{match['org']}/{match['name']}"
    return path.name


def license_of(model: str | Path) -> dict[str, str]:
    """The license keys (``license``, and ``license_name``/``license_link`` for "other")
    stated by a model folder's own card, else by its ``config.json``; empty when neither says.
    Read from disk only: nothing is downloaded."""
    folder = Path(model)
    stated = _card_metadata(folder / "README.md")
    if not isinstance(stated.get("license"), str):
        stated = _json_object(folder / "config.json")
    if not isinstance(stated.get("license"), str):
        return {}
    return {key: stated[key] for key in LICENSE_KEYS if isinstance(stated.get(key), str)}


def _card_metadata(path: Path) -> dict[str, Any]:
    """The metadata of the model card at ``path``; empty if it is missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}
    return card.data.to_dict()


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty if it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class CardFacts:
    """What a merged model's card says: how it was made and from what."""

    method: str
    description: str  # one line: what the method did
    base: Path | None
    sources: Sequence[Path]
    recipe: str  # the recipe as saved beside the card (paths relative to the card's folder)
    seed: int | None = None
    sections: dict[str, str] = field(default_factory=dict)  # extra "## title" -> Markdown


def card_data(facts: CardFacts) -> ModelCardData:
    """The card's metadata: merged models, relation, library, tags and the base's license."""
    models = ([facts.base] if facts.base else []) + list(facts.sources)
    names = [model_name(p) for p in models]
    license_keys = license_of(reference_folders(models[0])[0]) if models else {}
    return ModelCardData(
        base_model=list(dict.fromkeys(names)),
        base_model_relation="merge",
        library_name="transformers",
        tags=list(dict.fromkeys(["merge", "dammerge", facts.method])),
        **license_keys,
    )


def card_text(facts: CardFacts) -> str:
    """The whole ``README.md``: metadata block, then how the model was made and the recipe."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = f"`{model_name(facts.base)}`" if facts.base else "none"
    sources = "\n".join(f"- `{model_name(p)}`" for p in facts.sources)
    lines = [
        "# Merged model",
        "",
        f"Made with dammerge {__version__} on {when} using **{facts.method}** "
        f"({facts.description}).",
        "",
        f"Base model: {base}",
        "",
        f"Merged models:\n{sources}",
    ]
    if facts.seed is not None:
        lines += ["", f"Seed: {facts.seed}"]
    for title, body in facts.sections.items():
        lines += ["", f"## {title}", "", body]
    seed = "" if facts.seed is None else f" --seed {facts.seed}"
    lines += [
        "",
        "## Recipe",
        "",
        "Saved beside the weights as `dammerge_config.yml`, with its paths relative to this "
        f"folder: `dammerge merge THIS_FOLDER/dammerge_config.yml OUT{seed}` rebuilds the model "
        "from any working folder.",
        "",
        f"```yaml\n{facts.recipe.rstrip()}\n```",
    ]
    body = "\n".join(lines) + "\n"
    return str(ModelCard(f"---\n{card_data(facts).to_yaml()}\n---\n\n{body}"))

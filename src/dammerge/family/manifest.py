"""The miniature family's manifest: what a built family folder holds, read back as data.

A family folder is ordinary files (HF model folders and JSONL splits) plus ``manifest.json``.
Everything that consumes a family (the evaluator, learned merging, evolution, the experiment
runner) goes through :func:`load_family`, so the layout is defined in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dammerge.errors import DammergeError

MANIFEST_NAME = "manifest.json"
FORMAT = "dammerge-family/1"
DOMAINS = ("lang", "math", "sql")
# How far the specialists moved from their base (``dammerge.family.build``, docs/family.md).
REGIMES = ("near", "far")
DEFAULT_REGIME = "far"


@dataclass(frozen=True)
class DomainSpec:
    """One domain of a family: its specialist, its splits and its primary metric."""

    name: str
    specialist_dir: Path
    train: Path
    eval: Path
    metric: str


@dataclass(frozen=True)
class Family:
    """A built family folder, with absolute paths resolved from its manifest."""

    root: Path
    manifest: dict[str, Any]
    domains: dict[str, DomainSpec]
    compositional: DomainSpec | None
    models: dict[str, Path] = field(default_factory=dict)

    def model_dir(self, name: str) -> Path:
        """The folder of model ``name`` (``base`` or a domain's specialist)."""
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models)
            raise DammergeError(
                f"family {self.root} has no model {name!r}", f"known models: {known}"
            ) from None


def _inside(root: Path, relative: str, what: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DammergeError(
            f"{what} path {relative!r} in {root / MANIFEST_NAME} points outside the family",
            "rebuild the family with `dammerge family build`",
        )
    return path


def load_family(root: str | Path) -> Family:
    """Read ``root/manifest.json`` and return the family it describes."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DammergeError(
            f"{root} is not a dammerge family (no {MANIFEST_NAME})",
            "build one with `dammerge family build DIR`",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DammergeError(f"cannot read {manifest_path}: {exc}", "rebuild the family") from None
    if manifest.get("format") != FORMAT:
        raise DammergeError(
            f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}",
            "rebuild the family with this version of dammerge",
        )
    models = {name: _inside(root, rel, "model") for name, rel in manifest["models"].items()}
    domains = {}
    for name, spec in manifest["domains"].items():
        domains[name] = DomainSpec(
            name=name,
            specialist_dir=models[spec["specialist"]],
            train=_inside(root, spec["train"], "data"),
            eval=_inside(root, spec["eval"], "data"),
            metric=spec["metric"],
        )
    comp = manifest.get("compositional")
    compositional = None
    if comp:
        compositional = DomainSpec(
            name="compositional",
            specialist_dir=models["base"],
            train=_inside(root, comp.get("train", comp["eval"]), "data"),
            eval=_inside(root, comp["eval"], "data"),
            metric=comp["metric"],
        )
    return Family(
        root=root, manifest=manifest, domains=domains, compositional=compositional, models=models
    )

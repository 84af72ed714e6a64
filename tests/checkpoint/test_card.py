"""The model card beside a merged checkpoint: metadata that huggingface_hub reads back."""

from __future__ import annotations

import shutil

import yaml
from huggingface_hub import ModelCard

import dammerge
from dammerge.checkpoint.card import license_of, model_name


def test_the_card_metadata_parses_with_huggingface_hub(llama_family, tmp_path):
    base, variants = llama_family
    licensed = tmp_path / "base"
    shutil.copytree(base, licensed)
    (licensed / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# Base\n"
    )
    recipe = {
        "merge_method": "ties",
        "base_model": str(licensed),
        "models": [
            {"model": str(v), "parameters": {"weight": 1.0, "density": 0.5}} for v in variants
        ],
    }
    out = dammerge.merge(recipe, tmp_path / "merged", progress=False, seed=4)

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["base", *(v.name for v in variants)]
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["merge", "dammerge", "ties"]
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other",
        "tiny-license",
        "LICENSE",
    )
    # the body holds the recipe exactly as saved beside it (paths relative to the folder)
    saved = (out / "dammerge_config.yml").read_text()
    assert f"```yaml\n{saved.rstrip()}\n```" in card.text
    assert yaml.safe_load(saved)["base_model"] == "../base"
    assert "Seed: 4" in card.text


def test_no_license_is_claimed_without_one(llama_family, tmp_path):
    _, variants = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(v)} for v in variants],
        "parameters": {"weight": 1.0},
    }
    out = dammerge.merge(recipe, tmp_path / "merged", progress=False)
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "license" not in data
    assert data["base_model"] == [v.name for v in variants]
    assert data["tags"] == ["merge", "dammerge", "linear"]


def test_model_names_and_licenses_are_read_from_disk(tmp_path):
    cached = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    cached.mkdir(parents=True)
    assert model_name(cached) == "acme/tiny-llama"
    assert model_name(tmp_path / "my-model") == "my-model"
    assert license_of(cached) == {}
    (cached / "config.json").write_text('{"license": "mit"}')
    assert license_of(cached) == {"license": "mit"}
    (cached / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert license_of(cached) == {"license": "apache-2.0"}  # the card wins
    (cached / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert license_of(cached) == {"license": "mit"}  # an unreadable card is passed over

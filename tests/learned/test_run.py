"""The whole path: recipe validation (one-line errors before training) and the CLI end to end."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dammerge
from dammerge.config import MergeConfig
from dammerge.errors import DammergeError
from dammerge.learned import run as run_module
from dammerge.learned.export import COEFFICIENTS_FILE, STATS_FILE
from dammerge.testing import make_tiny_model

from .helpers import prepare_recipe


def _expect_error(recipe: dict, out, match: str, monkeypatch) -> DammergeError:
    """The recipe fails with a one-line DammergeError and no training ever starts."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(run_module, "train_plan", no_training)
    with pytest.raises(DammergeError, match=match) as info:
        dammerge.merge(recipe, out, progress=False)
    assert "\n" not in info.value.message
    assert not out.exists()
    return info.value


def test_missing_field(untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch):
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"question": "w3", "answer": "w4"}) + "\n")
    recipe = dam_recipe(*untied_family, datasets_dir)
    recipe["models"][1]["dataset"] = {"path": str(bad)}
    error = _expect_error(recipe, tmp_path / "out", "no column 'instruction'", monkeypatch)
    assert "question, answer" in error.hint
    recipe["models"][1]["dataset"]["fields"] = {"instruction": "question", "output": "answer"}
    monkeypatch.undo()
    prepare_recipe(recipe, tmp_path / "out")  # mapped: accepted


@pytest.mark.parametrize(
    "tokenizer", [{"tokenizer_source": "union"}, {"tokenizer": {"source": "base"}}]
)
def test_vocabulary_changes_are_refused(
    untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch, tokenizer
):
    recipe = {**dam_recipe(*untied_family, datasets_dir), **tokenizer}
    _expect_error(recipe, tmp_path / "out", "for data-free methods", monkeypatch)


def test_chat_template_is_written_into_the_output(
    untied_family, tmp_path, dam_recipe, datasets_dir
):
    from transformers import AutoTokenizer

    recipe = {**dam_recipe(*untied_family, datasets_dir, steps=1), "chat_template": "chatml"}
    out = dammerge.merge(recipe, tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    conversation = [{"role": "user", "content": "w5"}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == "<|im_start|>user\nw5<|im_end|>\n"
    bad = {**recipe, "chat_template": "chatmll"}
    with pytest.raises(DammergeError, match="unknown chat_template"):
        dammerge.merge(bad, tmp_path / "bad", progress=False)


def test_weights_dtype_follows_training_then_recipe_then_base(
    untied_family, tmp_path, dam_recipe, datasets_dir
):
    recipe = dam_recipe(*untied_family, datasets_dir)
    base_dtype = prepare_recipe(recipe, tmp_path / "out").dtype
    assert base_dtype == torch.float32
    recipe["dtype"] = "bfloat16"  # a mergekit recipe's compute dtype
    assert prepare_recipe(recipe, tmp_path / "out").dtype == (torch.bfloat16)
    recipe["training"]["dtype"] = "float16"  # training.dtype wins
    assert prepare_recipe(recipe, tmp_path / "out").dtype == (torch.float16)


def test_empty_dataset(untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch):
    empty = tmp_path / "empty.csv"
    empty.write_text("instruction,input,output\n")
    recipe = dam_recipe(*untied_family, datasets_dir)
    recipe["models"][0]["dataset"] = {"path": str(empty)}
    _expect_error(recipe, tmp_path / "out", "is empty", monkeypatch)


def test_missing_dataset_block(untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch):
    recipe = dam_recipe(*untied_family, datasets_dir)
    del recipe["models"][0]["dataset"]
    _expect_error(recipe, tmp_path / "out", "has no dataset", monkeypatch)


def test_misspelt_training_option(untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch):
    recipe = dam_recipe(*untied_family, datasets_dir, lamda_cos=0.1)
    _expect_error(recipe, tmp_path / "out", "training.lamda_cos", monkeypatch)


@pytest.mark.parametrize(
    ("kind", "match"),
    [("shape", "do not share tensor names and shapes"), ("type", "is a mistral model")],
)
def test_architecture_mismatch(
    untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch, kind, match
):
    if kind == "shape":
        odd = make_tiny_model(
            tmp_path / "odd",
            "llama",
            num_hidden_layers=2,
            tie_word_embeddings=False,
            hidden_size=64,
        )
    else:
        odd = make_tiny_model(tmp_path / "odd", "mistral", tie_word_embeddings=False)
    base, sources = untied_family
    recipe = dam_recipe(base, [sources[0], odd], datasets_dir)
    _expect_error(recipe, tmp_path / "out", match, monkeypatch)


def test_tokenizer_mismatch(untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch):
    base, sources = untied_family
    other = tmp_path / "other_tok"
    shutil.copytree(sources[1], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["w5"], vocab["w6"] = vocab["w6"], vocab["w5"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    recipe = dam_recipe(base, [sources[0], other], datasets_dir)
    _expect_error(recipe, tmp_path / "out", "tokenizer of .* differs", monkeypatch)


def test_existing_output_refused_before_training(
    untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(run_module, "train_plan", no_training)
    with pytest.raises(DammergeError, match="already exists"):
        dammerge.merge(dam_recipe(*untied_family, datasets_dir), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_init_for_activation(untied_family, tmp_path, dam_recipe, datasets_dir, monkeypatch):
    recipe = dam_recipe(*untied_family, datasets_dir, activation="sigmoid", init=1.5)
    _expect_error(recipe, tmp_path / "out", "outside sigmoid's range", monkeypatch)


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def _cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """Run ``dammerge ARGS`` in-process (as the console script does); returns (code, stderr)."""
    from dammerge.cli import main

    monkeypatch.setattr(sys, "argv", ["dammerge", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end(untied_family, tmp_path, dam_recipe, datasets_dir, capsys, monkeypatch):
    recipe = dam_recipe(*untied_family, datasets_dir, steps=3, keep_work=True)
    (tmp_path / "dam.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, monkeypatch, "merge", "dam.yaml", "out", "--dry-run")
    assert code == 0, err
    assert "dry run" in err and not (tmp_path / "out").exists()

    code, err = _cli(capsys, monkeypatch, "merge", "dam.yaml", "out", "--seed", "1")
    assert code == 0, err
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()
    assert (out / COEFFICIENTS_FILE).is_file() and (out / "train_log.jsonl").is_file()
    assert "merge_method: dam" in (out / "dammerge_config.yml").read_text()
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["base_model_relation"] == "merge" and card["tags"] == ["merge", "dammerge", "dam"]
    assert card["base_model"] == [Path(recipe["base_model"]).name] + [
        Path(m["model"]).name for m in recipe["models"]
    ]
    # the saved recipe names the same inputs when read from another working folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    saved = MergeConfig.from_yaml(out / "dammerge_config.yml")
    monkeypatch.chdir(tmp_path)
    original = MergeConfig.from_yaml("dam.yaml")
    assert saved.map_paths(_resolved) == original.map_paths(_resolved)
    assert (tmp_path / "out.dammerge-work" / "checkpoint.pt").is_file()  # keep_work: true
    stats = json.loads((out / STATS_FILE).read_text())
    trained = 3 * 1 * len(recipe["models"])  # steps x batch size x sources
    assert stats["steps"] == 3 and stats["backward_passes"] == trained
    assert stats["forward_passes"] == 2 * trained  # merged + on-the-fly teacher forwards

    code, err = _cli(capsys, monkeypatch, "inspect", "out")
    assert code == 0, err
    for name in ("by_layer", "by_module", "by_model"):
        assert (out / "coefficient_plots" / f"coefficients_{name}.png").stat().st_size > 1000

    code, err = _cli(capsys, monkeypatch, "merge", "dam.yaml", "out")  # output exists
    assert code == 2
    assert err.startswith("error: output folder") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # error + hint


@pytest.mark.slow
def test_work_folder_is_reused_only_by_the_same_recipe(
    untied_family, tmp_path, dam_recipe, datasets_dir
):
    """keep_work: the precomputed teacher files are reused by a re-run (not rewritten), and a
    training checkpoint left by another recipe is refused before anything is written."""
    work = {"steps": 2, "keep_work": True, "teacher": "precomputed"}
    recipe = dam_recipe(*untied_family, datasets_dir, **work)
    out = tmp_path / "out"
    dammerge.merge(recipe, out, progress=False)
    teachers = sorted((tmp_path / "out.dammerge-work" / "teachers").glob("*.safetensors"))
    assert len(teachers) == len(recipe["models"])
    stamps = [t.stat().st_mtime_ns for t in teachers]
    first = load_file(out / COEFFICIENTS_FILE)
    shutil.rmtree(out)

    dammerge.merge(recipe, out, progress=False)  # same recipe
    assert [t.stat().st_mtime_ns for t in teachers] == stamps
    again = load_file(out / COEFFICIENTS_FILE)  # resumed at its last step: nothing retrained
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    shutil.rmtree(out)

    changed = dam_recipe(*untied_family, datasets_dir, **work, lr=0.5)
    with pytest.raises(DammergeError, match="belongs to a different recipe"):
        dammerge.merge(changed, out, progress=False)
    assert not out.exists()


def test_unwritable_output_refused_before_training(
    untied_family, unwritable_folder, dam_recipe, datasets_dir, monkeypatch
):
    recipe = dam_recipe(*untied_family, datasets_dir)
    _expect_error(recipe, unwritable_folder / "out", "cannot write", monkeypatch)


def test_inspect_refuses_unwritable_plots_before_reading(
    unwritable_folder, tmp_path, capsys, monkeypatch
):
    from dammerge.learned import inspect as inspect_module

    read = []
    monkeypatch.setattr(inspect_module, "coefficient_rows", lambda folder: read.append(folder))
    merged = tmp_path / "merged"
    merged.mkdir()
    for plots in (unwritable_folder, unwritable_folder / "plots"):
        code, err = _cli(capsys, monkeypatch, "inspect", str(merged), "--plots", str(plots))
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot write plots folder" in errors[0], err
    assert read == []

"""Bad input through the real command line: one `error:` line (and a `hint:`), exit code 2,
no traceback, and nothing written: no output folder, no temporary sibling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from dammerge.cli import main

TMP_MARKER = ".dammerge-tmp-"


def write_recipe(folder: Path, recipe: dict | str) -> Path:
    path = folder / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def ties(base: Path, *models: Path, **extra) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models
        ],
        **extra,
    }


def _shape_mismatch(family, tmp, derive):
    base, (a, *_) = family

    def edit(state):
        state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(63, 32)
        return state

    return ties(base, derive(a, tmp / "odd", edit)), "do not share tensor names and shapes"


def _missing_tensor(family, tmp, derive):
    base, (a, *_) = family

    def edit(state):
        del state["model.layers.0.self_attn.k_proj.weight"]
        return state

    return ties(base, derive(a, tmp / "odd", edit)), "lacks model.layers.0.self_attn.k_proj"


def _truncated_shard(family, tmp, derive):
    base, (a, *_) = family
    broken = derive(a, tmp / "broken", shard_files=2)
    shard = broken / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return ties(base, broken), "truncated or corrupt"


def _index_outside(family, tmp, derive):
    base, (a, *_) = family
    hostile = derive(a, tmp / "hostile", shard_files=2)
    index_file = hostile / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../etc/passwd"
    index_file.write_text(json.dumps(index))
    return ties(base, hostile), "outside the model folder"


def _pickle(family, tmp, derive):
    base, (a, *_) = family
    pickled = tmp / "pickled"
    pickled.mkdir()
    shutil.copyfile(a / "config.json", pickled / "config.json")
    torch.save({"w": torch.ones(2)}, pickled / "pytorch_model.bin")
    return ties(base, pickled), "pickle"


def _output_inside_input(family, tmp, derive):
    base, (a, *_) = family
    return ties(base, a), "overlaps input model"


def _unknown_method(family, tmp, derive):
    base, (a, *_) = family
    return {**ties(base, a), "merge_method": "frankenstein"}, "unknown merge_method"


def _unknown_parameter(family, tmp, derive):
    base, (a, *_) = family
    recipe = ties(base, a)
    recipe["models"][0]["parameters"]["denisty"] = 0.3
    return recipe, "unknown parameter 'denisty'"


def _bad_yaml(family, tmp, derive):
    return "merge_method: ties\nmodels: [{model: a\n  - broken", "not valid YAML"


def _missing_model_folder(family, tmp, derive):
    base, _ = family
    return ties(base, tmp / "no-such-model"), "model folder not found"


def _bad_dtype(family, tmp, derive):
    base, (a, *_) = family
    return ties(base, a, out_dtype="float8"), "unknown dtype"


CASES: dict[str, Callable] = {
    "shape mismatch": _shape_mismatch,
    "missing tensor": _missing_tensor,
    "truncated shard": _truncated_shard,
    "index outside folder": _index_outside,
    "pickle without --allow-pickle": _pickle,
    "output inside an input folder": _output_inside_input,
    "unknown method": _unknown_method,
    "unknown parameter": _unknown_parameter,
    "bad YAML": _bad_yaml,
    "missing model folder": _missing_model_folder,
    "unknown dtype": _bad_dtype,
}


def run_main(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    """Run the console entry point in-process, as `dammerge ARGS` would."""
    monkeypatch.setattr(sys, "argv", ["dammerge", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capfd.readouterr().err


def assert_one_line_error(stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert expected in errors[0], stderr
    assert "Traceback" not in stderr
    hints = [line for line in lines if line.startswith("hint:")]
    assert len(hints) <= 1
    assert set(lines) <= {*errors, *hints}, stderr  # nothing else: no warnings, no wrapping


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}{TMP_MARKER}*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(
    case, llama_family, tmp_path, derive, monkeypatch, capfd
):
    recipe, expected = CASES[case](llama_family, tmp_path, derive)
    recipe_file = write_recipe(tmp_path, recipe)
    inside = case == "output inside an input folder"
    out = llama_family[1][0] / "merged" if inside else tmp_path / "merged"
    code, stderr = run_main(monkeypatch, capfd, "merge", recipe_file, out)
    assert code == 2
    assert_one_line_error(stderr, expected)
    assert_nothing_written(out)


def test_missing_or_folder_recipe(tmp_path, monkeypatch, capfd):
    code, stderr = run_main(monkeypatch, capfd, "merge", tmp_path / "nope.yml", tmp_path / "o")
    assert code == 2
    assert_one_line_error(stderr, "recipe not found")
    code, stderr = run_main(monkeypatch, capfd, "merge", tmp_path, tmp_path / "o")
    assert code == 2
    assert_one_line_error(stderr, "is a folder")
    assert_nothing_written(tmp_path / "o")


def test_existing_output_without_overwrite(llama_family, tmp_path, monkeypatch, capfd):
    base, (a, *_) = llama_family
    out = tmp_path / "merged"
    out.mkdir()
    code, stderr = run_main(monkeypatch, capfd, "merge", write_recipe(tmp_path, ties(base, a)), out)
    assert code == 2
    assert_one_line_error(stderr, "already exists")
    assert list(out.iterdir()) == []


def test_pickle_with_allow_pickle_merges(llama_family, tmp_path, monkeypatch, capfd):
    base, (a, *_) = llama_family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(a / name, pickled / name)
    from safetensors.torch import load_file

    torch.save(load_file(a / "model.safetensors"), pickled / "pytorch_model.bin")
    recipe_file = write_recipe(tmp_path, ties(base, pickled))
    out = tmp_path / "merged"
    code, _ = run_main(monkeypatch, capfd, "merge", recipe_file, out, "--allow-pickle")
    assert code == 0
    assert (out / "model.safetensors").is_file()


def test_long_messages_are_not_wrapped(tmp_path, monkeypatch, capfd):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 6, "model")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(deep), "parameters": {"weight": 1}}],
    }
    code, stderr = run_main(
        monkeypatch, capfd, "merge", write_recipe(tmp_path, recipe), tmp_path / "o"
    )
    assert code == 2
    assert_one_line_error(stderr, str(deep))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated shard", "unknown parameter"])
def test_real_console_script(case, llama_family, tmp_path, derive):
    """The installed `dammerge` executable, in its own process."""
    recipe, expected = CASES[case](llama_family, tmp_path, derive)
    out = tmp_path / "merged"
    executable = Path(sys.executable).with_name("dammerge")
    done = subprocess.run(
        [str(executable), "merge", str(write_recipe(tmp_path, recipe)), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "40",
        },
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, expected)
    assert done.stdout == ""
    assert_nothing_written(out)


def test_methods_lists_every_registered_and_data_informed_method(monkeypatch, capfd):
    """`dammerge methods`: one row per method with its parameters and defaults."""
    from dammerge.registry import REGISTRY

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    monkeypatch.setattr(sys, "argv", ["dammerge", "methods"])
    main()
    out = capfd.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert set(REGISTRY) <= set(rows)
    assert "density=1.0" in rows["ties"] and "weight" in rows["ties"]
    assert "lambda=1.0" in rows["ties"]

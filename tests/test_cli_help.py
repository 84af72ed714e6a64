"""`--help` is fast (no torch), and the help texts say what the registry and the docs say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer

import dammerge
from dammerge import cli
from dammerge.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_importing_the_command_line_does_not_import_torch():
    done = run_python("import dammerge.cli, sys; assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_every_help_page_is_printed_without_torch_or_transformers():
    done = run_python(
        """
        import sys
        from dammerge.cli import app
        pages = [[], ["merge"], ["methods"], ["demo"], ["evaluate"], ["experiment"],
                 ["inspect"], ["family"], ["family", "build"]]
        for page in pages:
            try:
                app([*page, "--help"], standalone_mode=False)
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
        print("heavy:", heavy)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout
    assert "Usage" in done.stdout  # the pages were printed


def test_the_public_names_are_still_there_on_first_use():
    from dammerge.config import MergeConfig
    from dammerge.dispatch import merge
    from dammerge.errors import DammergeError

    assert dammerge.merge is merge
    assert dammerge.MergeConfig is MergeConfig
    assert dammerge.DammergeError is DammergeError
    assert set(dammerge.__all__) == {"DammergeError", "MergeConfig", "__version__", "merge"}
    with pytest.raises(AttributeError):
        _ = dammerge.not_a_name


def option_help(path: list[str], name: str) -> str:
    """The help text of option ``--name`` of the command at ``path`` (as click holds it)."""
    command = typer.main.get_command(cli.app)
    for part in path:
        command = command.commands[part]
    (param,) = [p for p in command.params if p.name == name]
    return param.help


def method_families(names) -> set[str]:
    """dare_ties -> dare; the word a person uses for a group of methods."""
    return {name.split("_")[0] for name in names}


def test_seed_help_names_exactly_the_seeded_methods():
    seeded = {name for name, entry in REGISTRY.items() if entry.seeded}
    text = option_help(["merge"], "seed")
    named = {name for name in REGISTRY if re.search(rf"\b{name}\b", text)}
    assert named == seeded


def test_the_recipe_docs_seed_row_names_the_seeded_method_families():
    row = next(
        line
        for line in (ROOT / "docs" / "recipes.md").read_text().splitlines()
        if "`--seed" in line
    )
    seeded = method_families(n for n, e in REGISTRY.items() if e.seeded)
    unseeded = method_families(n for n, e in REGISTRY.items() if not e.seeded) - seeded
    for family in seeded:
        assert re.search(rf"\b{family}\b", row, re.IGNORECASE), (family, row)
    for family in unseeded:
        assert not re.search(rf"\b{family}\b", row, re.IGNORECASE), (family, row)


def test_family_size_help_quotes_the_documented_build_time():
    text = option_help(["family", "build"], "size")
    assert "micro" in text and "small" in text and "docs/family.md" in text
    row = next(
        line
        for line in (ROOT / "docs" / "family.md").read_text().splitlines()
        if line.startswith("| build time")
    )
    small_seconds = float(re.findall(r"\| (\d+) s", row)[-1])
    minutes = int(re.search(r"about (\d+) minutes", text).group(1))
    assert minutes == round(small_seconds / 60)


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if e.data_free is None])
def test_methods_names_the_training_keys_and_where_all_of_them_are(name):
    entry = REGISTRY[name]
    text = cli._training_keys(entry)
    fields = list(entry.settings_model.model_fields)
    listed = text.removeprefix("training: ").split(", ...")[0].split(", ")
    assert listed and set(listed) <= set(fields)
    doc = re.search(r"keys: (docs/\w+\.md)\)", text).group(1)
    assert f"({len(fields)} keys: " in text
    documented = (ROOT / doc).read_text()
    missing = [key for key in fields if not re.search(rf"\b{key}\b", documented)]
    assert not missing, f"{doc} does not describe {missing}"


def test_dammerge_methods_prints_no_see_readme_placeholder(capfd, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dammerge", "methods"])
    monkeypatch.setenv("COLUMNS", "400")
    cli.main()
    out = capfd.readouterr().out
    assert "see README" not in out and "(see docs)" not in out
    assert "docs/dam.md" in out and "docs/evolve.md" in out

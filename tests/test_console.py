"""One voice on the terminal: the Hugging Face libraries' own bars and advisories are silenced
at the command line's entry (the dataset, report and dry-run lines are tested beside their
modules)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dammerge.terminal import QUIET_ENVIRONMENT
from dammerge.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# Load and save a model with transformers, after (or without) dammerge's entry point.
CHILD = """
import sys
folder, how = sys.argv[1], sys.argv[2]
if how == "through-main":
    from dammerge.cli import main
    sys.argv = ["dammerge", "--version"]
    try:
        main()
    except SystemExit:
        pass
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(folder)
model.save_pretrained(folder + "-" + how)
print("done")
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("quiet") / "model", "llama", seed=0)


def load_and_save(model: Path, how: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(model), how],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    assert done.stdout.splitlines()[-1] == "done"
    return done.stderr


def test_transformers_prints_its_own_bars_without_the_switch(tiny_model, tmp_path):
    """The reference: what a bare transformers load and save print."""
    stderr = load_and_save(tiny_model, "bare")
    assert "Loading weights" in stderr and "Writing model shards" in stderr


def test_the_command_line_entry_silences_them(tiny_model):
    stderr = load_and_save(tiny_model, "through-main")
    assert "Loading weights" not in stderr
    assert "Writing model shards" not in stderr
    assert "\x1b[" not in stderr and "\r" not in stderr


def test_a_users_choice_is_kept(monkeypatch):
    from dammerge.terminal import quiet_libraries

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    for name in QUIET_ENVIRONMENT:
        if name != "HF_HUB_DISABLE_PROGRESS_BARS":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(
        "transformers.utils.logging.disable_progress_bar",
        lambda: pytest.fail("the user asked for the bars"),
    )
    quiet_libraries()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"

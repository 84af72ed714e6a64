"""Ctrl-C during DAM training, in a real process: exit 130, one line, and the run resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    executable = Path(sys.executable).with_name("dammerge")
    return subprocess.Popen(
        [str(executable), "merge", str(recipe), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_sigint_during_training_exits_130_and_the_run_resumes(
    untied_family, datasets_dir, dam_recipe, tmp_path
):
    recipe = dam_recipe(*untied_family, datasets_dir, steps=100_000, checkpoint_every=10_000)
    path = tmp_path / "dam.yml"
    path.write_text(yaml.safe_dump(recipe))
    out, work = tmp_path / "out", tmp_path / "out.dammerge-work"
    process = _start(path, out)
    deadline = time.monotonic() + 240
    log = work / "train_log.jsonl"
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and str(work) in interrupted[0], stderr
    assert not out.exists()
    saved = torch.load(work / "checkpoint.pt", weights_only=True)["step"]
    assert saved >= 3 and f"after step {saved}" in interrupted[0], stderr

    recipe["training"]["steps"] = saved + 2  # steps is bookkeeping: the same run, resumed
    path.write_text(yaml.safe_dump(recipe))
    process = _start(path, out)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert "resuming" in stderr
    stats = json.loads((out / "learned_stats.json").read_text())
    assert stats["steps"] == saved + 2

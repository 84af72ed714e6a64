"""The exported tasks run in the real lm-evaluation-harness and agree with `dammerge evaluate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dammerge.evaluate.evaluator import evaluate_models
from dammerge.evaluate.lm_eval_bridge import export_lm_eval
from dammerge.scoring.metrics import truncate_response

LM_EVAL = Path(sys.executable).with_name("lm_eval")
MAX_NEW_TOKENS = 12
LIMIT = 4


@pytest.mark.slow
@pytest.mark.skipif(not LM_EVAL.exists(), reason="lm_eval is not installed in this venv")
def test_lm_eval_scores_equal_dammerge_evaluate(fake_family, tmp_path):
    export = export_lm_eval(fake_family, tmp_path / "tasks", max_new_tokens=MAX_NEW_TOKENS)
    model = fake_family / "lang"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
    )
    tasks = ",".join([export.group, export.tasks["compositional"]])
    completed = subprocess.run(
        [
            str(LM_EVAL),
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--include_path",
            str(export.root),
            "--tasks",
            tasks,
            "--device",
            "cpu",
            "--limit",
            str(LIMIT),
            "--output_path",
            str(tmp_path / "out"),
            "--log_samples",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    lm_results = json.loads(results_file.read_text())["results"]

    ours = evaluate_models(
        [model],
        fake_family,
        limit=LIMIT,
        batch_size=16,
        max_new_tokens=MAX_NEW_TOKENS,
        progress=False,
    )
    scores = ours.models[str(model)]
    for domain, task in export.tasks.items():
        # Same greedy responses, record by record (lm-eval at batch size 1, ours batched).
        (samples_file,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        samples = sorted(
            (json.loads(line) for line in samples_file.read_text().splitlines()),
            key=lambda s: s["doc_id"],
        )
        assert [s["doc"]["id"] for s in samples] == ours.record_ids[domain]
        theirs = [truncate_response(s["filtered_resps"][0]) for s in samples]
        assert theirs == [truncate_response(r) for r in scores[domain].responses]
        assert [s["score"] for s in samples] == pytest.approx(list(scores[domain].record_scores))
        assert lm_results[task]["score,none"] == pytest.approx(scores[domain].score, abs=1e-12)
    assert lm_results[export.group]["score,none"] == pytest.approx(ours.average(str(model)))
    assert scores["lang"].score > 0  # chrF of random words is not 0: a non-trivial comparison

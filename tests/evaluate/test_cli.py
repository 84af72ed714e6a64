"""`dammerge evaluate` end to end on the fake family: output formats and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from dammerge.data.records import read_jsonl
from dammerge.scoring import metrics
from dammerge.scoring.metrics import score_record
from dammerge.templates import alpaca_prompt

from ..cli_helpers import run_cli

DOMAINS = ["lang", "math", "sql", "compositional"]


@pytest.fixture(scope="module")
def cli_outputs(fake_family, tmp_path_factory):
    """One CLI run writing every output (shared: it is the slow part)."""
    out = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    try:
        code = run_cli(
            mp,
            "evaluate",
            "base",
            fake_family / "lang",
            "--family",
            fake_family,
            "--limit",
            3,
            "--max-new-tokens",
            4,
            "--batch-size",
            2,
            "--json",
            out / "scores.json",
            "--markdown",
            out / "scores.md",
            "--plot",
            out / "plots" / "scores.png",
            "--responses",
            out / "responses.jsonl",
            "--names",
            "base,lang",
        )
    finally:
        mp.undo()
    assert code == 0
    return out


def test_json_has_exactly_the_documented_schema(cli_outputs, fake_family):
    data = json.loads((cli_outputs / "scores.json").read_text())
    assert list(data) == ["models", "labels", "settings"]
    assert list(data["models"]) == ["base", str(fake_family / "lang")]
    for entry in data["models"].values():
        assert list(entry) == [*DOMAINS, "average"]
        for domain in DOMAINS:
            assert list(entry[domain]) == ["score", "nll", "kl"]
            assert 0.0 <= entry[domain]["score"] <= 1.0
            assert entry[domain]["nll"] > 0
        assert entry["compositional"]["kl"] is None
        assert all(entry[d]["kl"] >= 0 for d in DOMAINS[:3])
        mean = sum(entry[d]["score"] for d in DOMAINS[:3]) / 3
        assert entry["average"] == pytest.approx(mean)
    assert data["models"][str(fake_family / "lang")]["lang"]["kl"] == 0.0


def test_json_names_the_labels_and_the_settings(cli_outputs, fake_family):
    from dammerge import __version__

    data = json.loads((cli_outputs / "scores.json").read_text())
    assert data["labels"] == {"base": "base", str(fake_family / "lang"): "lang"}  # --names
    settings = data["settings"]
    assert Path(settings.pop("family")).resolve() == fake_family.resolve()
    assert settings == {
        "limit": 3,
        "batch_size": 2,
        "max_new_tokens": 4,
        "device": "cpu",
        "dtype": "float32",
        "decoding": "greedy",
        "dammerge_version": __version__,
    }


def test_markdown_png_and_responses_are_written(cli_outputs):
    text = (cli_outputs / "scores.md").read_text()
    assert "| model | lang | math | sql | average | compositional |" in text
    assert "| lang |" in text  # the --names label
    png = (cli_outputs / "plots" / "scores.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    lines = read_jsonl(cli_outputs / "responses.jsonl")
    assert len(lines) == 2 * 4 * 3
    assert {"model", "domain", "id", "response", "score", "raw"} <= set(lines[0])
    assert not list(cli_outputs.glob(".*"))  # no temporary files left behind


def _one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], err


def test_bad_inputs_fail_with_one_line_before_any_compute(
    fake_family, tmp_path, monkeypatch, capsys
):
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fake_family / "base" / name, no_tokenizer / name)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "scores.json"
    cases = [
        ((tmp_path / "missing", "--family", fake_family), "does not exist"),
        ((empty, "--family", fake_family), "no config.json"),
        ((fake_family / "manifest.json", "--family", fake_family), "not a folder"),
        ((no_tokenizer, "--family", fake_family), "no tokenizer"),
        (("base", "--family", fake_family / "base"), "not a dammerge family"),
        (("base", "--family", fake_family, "--names", "a,b"), "2 names for 1 models"),
        (("base", "--family", fake_family, "--plot", tmp_path / "x.jpg"), "must end in .png"),
        (("base", "--family", fake_family, "--limit", 0), "--limit must be at least 1"),
        (("base", "base", "--family", fake_family), "given twice"),
        (("base",), "--family is required"),
        (("--family", fake_family), "no model folders"),
        (("base", "--family", fake_family, "--device", "cuda:9"), "cuda"),
    ]
    for args, needle in cases:
        code = run_cli(monkeypatch, "evaluate", *args, "--json", out)
        _one_line_error(capsys, code, needle)
        assert not out.exists()


def test_export_lm_eval_writes_tasks_scored_by_a_verbatim_metrics_copy(
    fake_family, tmp_path, monkeypatch, capsys
):
    export = tmp_path / "tasks"
    code = run_cli(
        monkeypatch, "evaluate", "--export-lm-eval", export, "--family", fake_family, "--limit", 4
    )
    assert code == 0
    names = sorted(p.name for p in export.iterdir())
    assert names == sorted(
        ["data", "utils.py", "dammerge.yaml", *(f"dammerge_{d}.yaml" for d in DOMAINS)]
    )
    source = (export / "utils.py").read_text()
    assert source.startswith(Path(metrics.__file__).read_text().rstrip("\n"))
    spec = importlib.util.spec_from_file_location("exported_utils", export / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for domain, metric in (
        ("lang", "translation"),
        ("math", "exact_match"),
        ("sql", "execution"),
        ("compositional", "exact_match"),
    ):
        docs = utils.load_docs(f"data/{domain}.jsonl")["test"]
        records = read_jsonl(fake_family / "data" / domain / "eval.jsonl")[:4]
        assert len(docs) == 4
        for doc, record in zip(docs, records, strict=True):
            assert utils.doc_to_text(doc) == alpaca_prompt(record["instruction"], record["input"])
            process = getattr(utils, f"process_{metric}")
            for response in (record["output"], "w1 w2 12", "SELECT 1"):
                assert process(doc, [response]) == {"score": score_record(metric, response, record)}
    task = (export / "dammerge_math.yaml").read_text()
    assert "process_results: !function utils.process_exact_match" in task
    assert '"\\n### "' in task and "do_sample: false" in task
    group = (export / "dammerge.yaml").read_text()
    assert "dammerge_compositional" not in group and "dammerge_sql" in group
    # A second export into the same folder needs --overwrite.
    code = run_cli(monkeypatch, "evaluate", "--export-lm-eval", export, "--family", fake_family)
    _one_line_error(capsys, code, "not empty")
    assert (
        run_cli(
            monkeypatch,
            "evaluate",
            "--export-lm-eval",
            export,
            "--family",
            fake_family,
            "--overwrite",
        )
        == 0
    )
    assert len(read_jsonl(export / "data" / "math.jsonl")) == 6


def test_unwritable_outputs_are_refused_before_any_compute(
    fake_family, unwritable_folder, monkeypatch, capsys
):
    import dammerge.evaluate.evaluator as evaluator
    import dammerge.evaluate.lm_eval_bridge as bridge

    computed = []
    monkeypatch.setattr(evaluator, "evaluate_models", lambda *a, **k: computed.append("scores"))
    monkeypatch.setattr(bridge, "load_domains", lambda *a, **k: computed.append("export"))
    for option, name in (
        ("--json", "scores.json"),
        ("--markdown", "scores.md"),
        ("--responses", "responses.jsonl"),
        ("--plot", "scores.png"),
    ):
        target = unwritable_folder / name
        code = run_cli(monkeypatch, "evaluate", "base", "--family", fake_family, option, target)
        _one_line_error(capsys, code, "cannot write")
    export = unwritable_folder / "tasks"
    code = run_cli(monkeypatch, "evaluate", "--export-lm-eval", export, "--family", fake_family)
    _one_line_error(capsys, code, "cannot write")
    assert computed == []
    assert not unwritable_folder.exists() or not any(unwritable_folder.iterdir())

"""One progress line per model: the specialist's pass runs under the model's bar (its stage in
the postfix), not as a second bar drawn beneath it with cursor-up codes."""

from __future__ import annotations

from tqdm import tqdm

from dammerge.evaluate import evaluator, teacher_forcing
from dammerge.evaluate.evaluator import evaluate_models


def immediate_progress(total: int, desc: str, enabled: bool):
    """The evaluator's bar as it is, less its half-second delay (tiny models finish first)."""
    return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, leave=False, delay=0)


def test_the_specialists_pass_shows_in_the_models_bar(fake_family, monkeypatch, capfd):
    monkeypatch.setattr(evaluator, "_progress", immediate_progress)
    monkeypatch.setattr(teacher_forcing, "_progress", immediate_progress)
    # transformers' own "Loading weights" bar is switched off at the command line's entry
    # (tests/test_console.py); here it would be one more nested bar
    monkeypatch.setattr("transformers.utils.logging._tqdm_active", False)
    evaluate_models(["base"], fake_family, limit=2, batch_size=2, max_new_tokens=2)
    err = capfd.readouterr().err
    assert "base:" in err  # the model's bar was drawn
    assert "lang: specialist" in err  # the specialist's stage is the bar's postfix
    assert "specialist lang:" not in err  # no bar of its own
    assert "\x1b[A" not in err  # no cursor moved up to redraw a bar above


def test_a_teacher_cache_alone_still_shows_its_bar(fake_family, monkeypatch, capfd):
    from dammerge.evaluate.data import load_domains
    from dammerge.evaluate.loading import load_model
    from dammerge.family.manifest import load_family

    monkeypatch.setattr(teacher_forcing, "_progress", immediate_progress)
    domain = load_domains(load_family(fake_family), limit=2)["lang"]
    _, tokenizer = load_model(fake_family / "base")
    teacher_forcing.TeacherCache(progress=True).rows(domain, tokenizer)
    assert "specialist lang:" in capfd.readouterr().err

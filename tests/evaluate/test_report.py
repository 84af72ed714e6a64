"""`dammerge evaluate --plot`: one panel per domain, each scaled to its scores, readable."""

from __future__ import annotations

from pathlib import Path

from dammerge.evaluate.evaluator import DomainScore, EvaluationResult
from dammerge.evaluate.report import scores_figure, write_plot

from ..plot_checks import assert_png_fits, assert_readable


def test_score_plot_is_scaled_to_small_scores_and_readable(tmp_path: Path) -> None:
    labels = {
        "out/ties": "TIES",
        "out/dam": "DAM, learned on 512 samples each",
        "lang": "lang",
    }
    domains = ["lang", "math", "sql", "compositional"]
    values = {"out/ties": (0.02, 0.01, 0.0, 0.0), "out/dam": (0.05, 0.03, 0.2, 0.04)}
    values["lang"] = (0.2, 0.0, 0.0, 0.0)
    result = EvaluationResult(
        models={
            key: {d: DomainScore(v, 1.0, 0.1) for d, v in zip(domains, scores, strict=True)}
            for key, scores in values.items()
        },
        labels=labels,
        domains=domains,
    )
    figure = scores_figure(result)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["lang", "math", "sql", "average", "compositional"]
    math_panel = figure.axes[1]
    assert math_panel.get_xlim()[0] == 0 and math_panel.get_xlim()[1] < 0.1
    average = figure.axes[3]
    expected = [sum(values[k][:3]) / 3 for k in values]  # the three specialist domains
    assert [bar.get_width() for bar in average.patches] == expected
    assert_readable(figure)
    write_plot(result, tmp_path / "scores.png")
    assert_png_fits(tmp_path / "scores.png")

"""The training loop: resume, divergence, float32 coefficients over bf16 weights, teachers."""

from __future__ import annotations

import json

import pytest
import torch

from dammerge import memory
from dammerge.learned import train as train_module
from dammerge.learned.run import train_plan
from dammerge.learned.train import CHECKPOINT, LOG, TrainingDiverged

from .helpers import training_plan as _plan


def _train(plan, **kwargs):
    model, result = train_plan(plan, progress=False, **kwargs)
    return model.coefficient_state(), result


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(
    untied_family, datasets_dir, tmp_path, dam_recipe, monkeypatch
):
    options = {"steps": 6, "checkpoint_every": 2, "lambda_l1": 1e-4}
    reference, _ = _train(_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "a", **options))

    # stopped cleanly after 3 steps (as after Ctrl-C), then resumed
    plan = _plan(dam_recipe, untied_family, datasets_dir, tmp_path / "b", **options)
    _, partial = _train(plan, stop_after=3)
    assert partial.steps == 3
    state, result = _train(
        _plan(dam_recipe, untied_family, datasets_dir, tmp_path / "b", **options)
    )
    assert result.resumed_from == 3 and result.steps == 6
    _assert_identical(state, reference)

    # killed inside step 5: resumes from the step-4 checkpoint
    original = train_module.Trainer.train_step

    def crash(self):
        if self.step == 4:
            raise RuntimeError("simulated kill")
        return original(self)

    plan = _plan(dam_recipe, untied_family, datasets_dir, tmp_path / "c", **options)
    monkeypatch.setattr(train_module.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _train(plan)
    monkeypatch.setattr(train_module.Trainer, "train_step", original)
    state, result = _train(
        _plan(dam_recipe, untied_family, datasets_dir, tmp_path / "c", **options)
    )
    assert result.resumed_from == 4
    _assert_identical(state, reference)
    steps = [json.loads(line)["step"] for line in (plan.work_dir / LOG).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_divergence_stops_before_the_update_and_keeps_the_checkpoint(
    untied_family, datasets_dir, tmp_path, dam_recipe, monkeypatch
):
    plan = _plan(
        dam_recipe, untied_family, datasets_dir, tmp_path / "out", steps=5, checkpoint_every=2
    )
    original = train_module.objective_with_grad  # the fused step's per-source loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value  # step 3, first source

    monkeypatch.setattr(train_module, "objective_with_grad", poisoned)
    with pytest.raises(TrainingDiverged, match="diverged at step 3"):
        train_plan(plan, progress=False)
    state = torch.load(plan.work_dir / CHECKPOINT, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["coefficients"].values())
    assert not plan.output.exists()


def test_steps_run_with_freed_memory_reused_and_the_defaults_come_back(
    untied_family, datasets_dir, tmp_path, dam_recipe, monkeypatch
):
    monkeypatch.delenv("DAMMERGE_REUSE_MEMORY", raising=False)
    original = train_module.Trainer.train_step
    seen = []

    def recording(self):
        seen.append(memory._active)
        return original(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", recording)
    _train(_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "out", steps=2))
    assert seen == [memory.available()] * 2
    assert not memory._active


def test_float32_coefficients_move_with_bf16_weights(
    untied_family, datasets_dir, tmp_path, dam_recipe
):
    plan = _plan(
        dam_recipe,
        untied_family,
        datasets_dir,
        tmp_path / "out",
        steps=3,
        lr=1e-4,
        dtype="bfloat16",
        lambda_cos=0.0,
    )
    state, _ = _train(plan)
    moved = max(float((t - 0.5).abs().max()) for t in state.values())
    assert all(t.dtype == torch.float32 for t in state.values())
    assert 0 < moved < 2**-9  # below bf16's half-spacing at 0.5: bf16 coefficients would not move
    assert all(torch.equal(t.bfloat16().float(), torch.full_like(t, 0.5)) for t in state.values())


def test_precomputed_full_vocabulary_teacher_matches_on_the_fly(
    untied_family, datasets_dir, tmp_path, dam_recipe
):
    common = {"steps": 2, "lambda_cos": 0.0}
    on_the_fly, _ = _train(_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "a", **common))
    plan = _plan(
        dam_recipe,
        untied_family,
        datasets_dir,
        tmp_path / "b",
        teacher="precomputed",
        top_k=128,
        **common,
    )
    precomputed, _ = _train(plan)
    assert (plan.work_dir / "teachers" / "source-0.safetensors").is_file()
    for name in on_the_fly:
        torch.testing.assert_close(precomputed[name], on_the_fly[name], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_step(
    untied_family, datasets_dir, tmp_path, dam_recipe
):
    plain, _ = _train(_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "a", steps=2))
    plan = _plan(
        dam_recipe,
        untied_family,
        datasets_dir,
        tmp_path / "b",
        steps=2,
        gradient_checkpointing=True,
    )
    checkpointed, _ = _train(plan)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)


def test_adamerging_preset_clamps_layer_coefficients(
    untied_family, datasets_dir, tmp_path, dam_recipe
):
    plan = _plan(
        dam_recipe, untied_family, datasets_dir, tmp_path / "out", method="adamerging", lr=0.5
    )
    assert plan.settings.objective == "entropy" and plan.settings.parametrization == "task_vectors"
    state, result = _train(plan)
    assert "entropy/ft0" in result.last
    for tensor in state.values():
        assert tensor.shape[-1] == 1 or tensor.dim() == 1
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert any(float((t - 0.3).abs().max()) > 0.1 for t in state.values())


def test_cosine_term_is_logged_and_reduces(untied_family, datasets_dir, tmp_path, dam_recipe):
    plan = _plan(
        dam_recipe, untied_family, datasets_dir, tmp_path / "out", steps=3, lambda_cos=1.0, lr=0.05
    )
    _train(plan)
    log = [json.loads(line) for line in (plan.work_dir / LOG).read_text().splitlines()]
    assert log[0]["cosine"] == pytest.approx(1.0, abs=1e-6)  # uniform start: identical vectors
    assert log[-1]["cosine"] < log[0]["cosine"]
    assert {"kl/ft0", "kl/ft1", "loss", "grad_norm"} <= set(log[0])


@pytest.mark.parametrize(
    ("objective", "direction", "top_k"),
    [
        ("kl", "forward", None),
        ("kl", "forward", 3),
        ("kl", "reverse", None),
        ("kl", "reverse", 3),
        ("mse", "forward", None),
        ("mse", "forward", 3),
        ("entropy", "forward", None),
    ],
)
def test_objective_with_grad_equals_autograd_of_objective(objective, direction, top_k):
    """The fused step's per-source loss and logit gradient, whichever way they are formed."""
    from dammerge.learned.presets import DAM
    from dammerge.learned.settings import parse_settings
    from dammerge.learned.teachers import TeacherOutput

    settings = parse_settings(
        {"objective": objective, "kl_direction": direction, "temperature": 2.0}, DAM
    )
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 11, generator=generator, dtype=torch.float64) * 3
    teacher_logits = torch.randn(6, 11, generator=generator, dtype=torch.float64) * 3
    if objective == "entropy":
        teacher = None
    elif top_k is None:
        teacher = TeacherOutput(logits=teacher_logits)
    else:
        values, indices = teacher_logits.topk(top_k, dim=-1)
        teacher = TeacherOutput(values=values, indices=indices)
    leaf = rows.clone().requires_grad_(True)
    expected = train_module.objective(settings, leaf, teacher, None)
    expected.backward()
    grad_out = torch.empty_like(rows)
    value = train_module.objective_with_grad(settings, rows, teacher, grad_out)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad_out, leaf.grad)


def test_ctrl_c_during_the_update_is_held_until_the_step_is_whole():
    """A SIGINT inside the deferred block is raised only when the block ends."""
    import os
    import signal

    from dammerge.learned.train import ctrl_c_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt), ctrl_c_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_teachers_on_the_fly_run_as_one_forward_per_step(
    untied_family, datasets_dir, tmp_path, dam_recipe, monkeypatch
):
    """The fused step runs every source's teacher in one batched forward (never one call per
    source), and trains the same coefficients as one teacher call per source."""
    from dammerge.learned.teachers import OnTheFlyTeacher

    calls = {"batched": 0, "single": 0}
    batched, single = OnTheFlyTeacher.batched, OnTheFlyTeacher.__call__

    def count(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(OnTheFlyTeacher, "batched", count("batched", batched))
    monkeypatch.setattr(OnTheFlyTeacher, "__call__", count("single", single))
    common = {"steps": 2, "batch_size": 2}
    together, _ = _train(_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "a", **common))
    assert calls == {"batched": 2, "single": 0}
    monkeypatch.setattr(train_module.Trainer, "_batched_teachers", lambda *args: None)
    one_by_one, _ = _train(_plan(dam_recipe, untied_family, datasets_dir, tmp_path / "b", **common))
    assert calls == {"batched": 2, "single": 4}
    for name in together:
        torch.testing.assert_close(together[name], one_by_one[name], rtol=0, atol=1e-6)
    assert max(float((v - 0.5).abs().max()) for v in together.values()) > 1e-4

"""Learned merging across ranks: how a step is shared, and the sharded merge module itself.

The sharded build runs for real on two CPU ranks over gloo (``torch.multiprocessing``): each
rank must hold only its rows of every store along the weight axis (every source's rows, never
whole sources), read only those rows from the files (never a whole tensor), and give the
coefficient gradients and teacher logits of the unsharded module. The command-line path under
torchrun is tested in ``test_distributed_cli.py``.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from dammerge.checkpoint.reader import Checkpoint
from dammerge.data.examples import Example, collate
from dammerge.errors import ConfigError, DammergeError
from dammerge.learned import distributed
from dammerge.learned.distributed import Distributed, launched_by_torchrun, resolve_strategy
from dammerge.learned.layers import CoefficientScheme, MergedLinear
from dammerge.learned.model import MergedModel, MergeOptions, build_merged_model
from dammerge.learned.sharded import build_sharded_model, held_store_bytes
from dammerge.learned.train import _stack_batches
from dammerge.testing import make_family

WORLD = 2
needs_gloo = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")


def _batches(n_sources: int, batch_size: int) -> list:
    """One batch per source of examples with different lengths and masks."""
    out = []
    for source in range(n_sources):
        examples = []
        for row in range(batch_size):
            length = 3 + (source * batch_size + row) % 4
            ids = list(range(5, 5 + length))
            examples.append(Example(ids, [j % 2 == 0 for j in range(length)]))
        out.append(collate(examples, list(range(batch_size)), pad_id=0))
    return out


def _ranks(rank: int, world: int) -> Distributed:
    return Distributed(torch.device("cpu"), rank, world, rank, backend="gloo")


def test_one_process_takes_every_batch_whole():
    batches = _batches(3, 2)
    portions = Distributed(torch.device("cpu")).portions(batches)
    assert [(p.source, p.batch, p.weight) for p in portions] == [
        (i, b, 1.0) for i, b in enumerate(batches)
    ]


def test_with_as_many_ranks_as_sources_rank_i_takes_source_i():
    batches = _batches(3, 1)
    for rank in range(3):
        (portion,) = _ranks(rank, 3).portions(batches)
        assert portion.source == rank and portion.batch is batches[rank] and portion.weight == 1


@pytest.mark.parametrize(("n_sources", "batch_size", "world"), [(3, 3, 2), (2, 3, 4), (3, 1, 2)])
def test_ranks_cover_every_row_once_and_weights_add_up(n_sources, batch_size, world):
    batches = _batches(n_sources, batch_size)
    seen: dict[int, list[int]] = {i: [] for i in range(n_sources)}
    weights = [0.0] * n_sources
    for rank in range(world):
        for portion in _ranks(rank, world).portions(batches):
            seen[portion.source] += portion.batch.indices
            weights[portion.source] += portion.weight
            counted = int(portion.batch.loss_mask.sum())
            whole = int(batches[portion.source].loss_mask.sum())
            assert math.isclose(portion.weight, counted / whole)
            length = int(portion.batch.attention_mask.sum(1).max())
            assert portion.batch.input_ids.shape[1] == length  # re-trimmed to its longest row
    assert all(sorted(rows) == list(range(batch_size)) for rows in seen.values())
    assert all(math.isclose(w, 1.0) for w in weights)


def test_teacher_calls_per_step_count_a_ranks_sources_of_equal_rows_as_one_forward():
    assert _ranks(0, 3).teacher_calls_per_step(3, 1) == 1
    assert _ranks(0, 2).teacher_calls_per_step(3, 1) == 1  # ranks take [s0] and [s1, s2]
    assert _ranks(1, 4).teacher_calls_per_step(2, 3) == 1  # [s0] [s0 s0] [s1] [s1 s1]
    assert _ranks(1, 4).teacher_calls_per_step(3, 2) == 1  # [s0] [s0 s1] [s1 s2] [s2]
    assert _ranks(0, 2).teacher_calls_per_step(3, 2) == 2  # [s0 s0 s1] [s1 s2 s2]: 2 rows, 1
    assert _ranks(0, 1).teacher_calls_per_step(5, 3) == 1  # one process: all together
    assert distributed.teachers_run_together([2, 2]) and not distributed.teachers_run_together(
        [2, 1]
    )


@pytest.mark.parametrize(("n_sources", "batch_size", "world"), [(3, 2, 2), (3, 1, 2), (5, 3, 4)])
def test_teacher_calls_per_step_are_what_each_rank_makes(n_sources, batch_size, world):
    """The count every rank agrees on (from the split's arithmetic) is the most forwards the
    trainer makes on any rank for the portions it is actually given."""
    batches = _batches(n_sources, batch_size)
    made = []
    for rank in range(world):
        rows = [p.batch.input_ids.shape[0] for p in _ranks(rank, world).portions(batches)]
        made.append(1 if distributed.teachers_run_together(rows) else len(rows))
    assert _ranks(0, world).teacher_calls_per_step(n_sources, batch_size) == max(made)


def test_a_lockstep_teacher_counts_a_batched_forward_as_one(untied_family):
    """A rank's teachers in one forward are one of the step's agreed forwards; the rest are
    made up on one token before the backward; one more than agreed is refused, not waited on."""
    from dammerge.learned.teachers import LockstepTeacher, OnTheFlyTeacher

    base, sources = untied_family
    model = build_merged_model(
        Checkpoint(base),
        [Checkpoint(s) for s in sources],
        MergeOptions(),
        keep_teacher_weights=True,
    )
    forwards = []
    model.model.register_forward_hook(
        lambda module, args, kwargs, out: forwards.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    teacher = LockstepTeacher(OnTheFlyTeacher(model), calls_per_step=2)
    batch = _stack_batches(_batches(2, 1), pad_id=0)
    out = teacher.batched([0, 1], batch)
    assert out.logits.shape[:2] == batch.input_ids.shape and teacher.calls == 1
    teacher.finish_step()
    assert forwards == [tuple(batch.input_ids.shape), (1, 1)] and teacher.calls == 0
    teacher.batched([0, 1], batch)
    teacher(0, _batches(1, 1)[0])
    with pytest.raises(RuntimeError, match="ranks agreed on 2"):
        teacher(1, _batches(1, 1)[0])


def test_stacked_portions_keep_each_rows_positions():
    batches = _batches(3, 3)
    portions = _ranks(1, 2).portions(batches)
    stacked = _stack_batches([p.batch for p in portions], pad_id=0)
    assert stacked.input_ids.shape[0] == sum(len(p.batch.indices) for p in portions)


def test_strategy_defaults_and_refusals():
    single = Distributed(torch.device("cpu"))
    assert resolve_strategy(single, None, 3, 1) == [] and single.strategy is None
    (note,) = resolve_strategy(single, "shard", 3, 1)
    assert "no effect in one process" in note and single.strategy is None
    ranks = _ranks(0, 3)
    assert resolve_strategy(ranks, None, 3, 1) == [] and ranks.strategy == "replicate"
    with pytest.raises(ConfigError, match="shard over 3 ranks needs at least 3 sequences") as info:
        resolve_strategy(ranks, "shard", 2, 1)
    assert "batch_size to 2" in info.value.hint
    (note,) = resolve_strategy(ranks, "replicate", 2, 1)
    assert "1 of 3 ranks have no sequence" in note


def test_torchrun_is_recognised_by_its_variables():
    assert not launched_by_torchrun({})
    assert not launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2"})
    assert launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_an_error_crosses_ranks_as_its_own_class():
    """A rank re-raises another rank's error as the same DammergeError subclass, message and
    hint, found among the defined classes (no module imported by name)."""
    error = ConfigError("training.steps: must be positive", "set steps: N")
    rebuilt = distributed._rebuild_error(distributed._describe_error(error))
    assert type(rebuilt) is ConfigError
    assert (rebuilt.message, rebuilt.hint) == (error.message, error.hint)
    unknown = distributed._rebuild_error(("elsewhere", "GoneError", "it failed", None))
    assert type(unknown) is DammergeError and unknown.message == "it failed"


def test_one_process_context_is_the_identity():
    ranks = Distributed(torch.device("cpu"))
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    assert ranks.reduce_step([param], [0.5, 1.5]).losses == [0.5, 1.5]
    assert torch.equal(param.grad, torch.full((3,), 2.0))
    assert ranks.from_main(lambda: 7) == 7 and ranks.gather(5) == [5]


def test_padded_stores_compute_what_unpadded_ones_do():
    torch.manual_seed(0)
    weights, biases = torch.randn(3, 5, 4), torch.randn(3, 5)
    scheme = CoefficientScheme(3)
    coefficients = torch.nn.Parameter(torch.rand(3, 4))
    plain = MergedLinear(weights, biases, scheme, coefficients)
    padded = MergedLinear(
        torch.cat([weights, torch.zeros(3, 1, 4)], 1),
        torch.cat([biases, torch.zeros(3, 1)], 1),
        scheme,
        coefficients,
        out_features=5,
    )
    x = torch.randn(2, 4)
    torch.testing.assert_close(padded(x), plain(x), rtol=0, atol=0)
    padded.selected = plain.selected = 1
    torch.testing.assert_close(padded(x), plain(x), rtol=0, atol=0)


# -- the sharded module on two gloo ranks --------------------------------------------------------
@pytest.fixture(scope="module")
def odd_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Untied, 3 sources, an intermediate size of 63 rows: the MLP stores need padding."""
    root = tmp_path_factory.mktemp("odd")
    return make_family(
        root, "llama", n=3, tie_word_embeddings=False, num_hidden_layers=2, intermediate_size=63
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _grads_and_teacher(model: MergedModel, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Coefficient gradients of a fixed token-weighted likelihood, and teacher 1's logits
    computed between that forward and its backward (as the trainer does)."""
    model.zero_grad(set_to_none=True)
    log_probs = model(ids).log_softmax(-1)
    with torch.no_grad(), model.teacher(1):
        teacher = model(ids)
    weights = torch.rand(log_probs.shape, generator=torch.Generator().manual_seed(7))
    (log_probs * weights).sum().backward()
    return {name: p.grad.detach().clone() for name, p in model.coefficient_groups()}, teacher


def _sharded_rank(rank: int, port: int, base: str, sources: list[str], out: str) -> None:
    os.environ.update(
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="False",
    )
    ranks = distributed.start("cpu")
    ranks.strategy = "shard"
    try:
        base_ck, source_cks = Checkpoint(Path(base)), [Checkpoint(Path(s)) for s in sources]
        options = MergeOptions(init="random", merge_norms=True, merge_embeddings=True)
        reference = build_merged_model(base_ck, source_cks, options, keep_teacher_weights=True)
        ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(3))
        expected, teacher_expected = _grads_and_teacher(reference, ids)
        with mock.patch.object(Checkpoint, "get", side_effect=AssertionError("whole read")):
            model = build_sharded_model(
                base_ck,
                source_cks,
                options,
                ranks=ranks,
                dtype=torch.float32,
                keep_teacher_weights=True,
                seed=0,
            )
        full = dict(reference.named_parameters())
        shards = {}
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                shards[name] = (
                    tuple(param.shape),
                    param.placements[0].dim,
                    param.to_local().clone(),
                    full[name].detach().clone(),
                )
        got, teacher_got = _grads_and_teacher(model, ids)
        torch.save(
            {
                "coefficients_sharded": any(
                    isinstance(p, DTensor) for p in model.coefficient_parameters()
                ),
                "shards": shards,
                "expected": expected,
                "got": got,
                "teacher_expected": teacher_expected,
                "teacher_got": teacher_got,
                "held": held_store_bytes(model),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        ranks.close()


@needs_gloo
@pytest.mark.slow
def test_sharded_module_holds_its_rows_of_every_store_and_keeps_the_gradients(odd_family, tmp_path):
    base, sources = odd_family
    args = (_free_port(), str(base), [str(s) for s in sources], str(tmp_path))
    mp.spawn(_sharded_rank, args=args, nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert not result["coefficients_sharded"]  # whole on every rank, all-reduced
        assert "model.model.layers.0.mlp.up_proj.weights" in result["shards"]
        for name, (shape, dim, local, whole) in result["shards"].items():
            rows = whole.shape[dim]
            padded = shape[dim]
            chunk = padded // WORLD if dim == 1 else math.ceil(rows / WORLD)
            first = min(rows, rank * chunk)
            last = min(rows, first + chunk)
            if dim == 1:  # a store: every source, this rank's rows of the weight axis
                assert local.shape[0] == whole.shape[0] == len(sources), name
                assert padded % WORLD == 0 and padded - rows < WORLD, name
                torch.testing.assert_close(local[:, : last - first], whole[:, first:last])
                assert not local[:, last - first :].any(), name  # padding rows are zero
            else:  # one base tensor (the embedding's and norms' own), split on its rows
                torch.testing.assert_close(local, whole[first:last])
        held = result["held"]
        assert held["largest_share"] <= (63 + 1) / 2 / 63 + 1e-9
        assert abs(held["held"] / held["full"] - 1 / WORLD) < 0.02
        assert result["expected"].keys() == result["got"].keys()
        for name, grad in result["expected"].items():
            torch.testing.assert_close(result["got"][name], grad, msg=name)
        torch.testing.assert_close(result["teacher_got"], result["teacher_expected"])

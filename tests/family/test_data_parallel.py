"""Batches split across worker processes train the model the one process trains."""

from __future__ import annotations

import copy
import itertools
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dammerge.data.examples import Example
from dammerge.family.data_parallel import predicted_tokens, shard, train_steps
from dammerge.family.train import Schedule, causal_lm_loss, collate, response_loss

PAD = 0
SCHEDULE = Schedule(steps=4, batch=4, lr=1e-2, weight_decay=0.1)


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def _response_batches() -> itertools.cycle:
    """Batches whose even and odd rows hold different numbers of response tokens, so that a
    plain mean of the two halves' means would be another loss."""
    batches = []
    for offset in range(3):
        examples = [
            Example.from_parts([1, 2, 3 + offset], [5 + offset] * (1 + 4 * (row % 2)) + [7])
            for row in range(4)
        ]
        batches.append(collate(examples, PAD))
    return itertools.cycle(batches)


def _packed_batches(seed: int) -> itertools.cycle:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 40, (12, 10), generator=generator)
    return itertools.cycle([{"input_ids": c, "labels": c} for c in rows.split(4)])


@pytest.mark.parametrize(
    ("batches", "loss_fn"),
    [(_response_batches, response_loss), (partial(_packed_batches, 3), causal_lm_loss)],
    ids=["response-loss", "pre-training"],
)
def test_two_ranks_train_the_weights_and_losses_of_one_process(batches, loss_fn):
    one, two = _model(), _model()
    one_losses = train_steps(one, batches, SCHEDULE, "one", loss_fn)
    two_losses = train_steps(two, batches, SCHEDULE, "two", loss_fn, ranks=2)
    # the losses agree to float32's precision (the pre-training loss is computed in float32)
    assert two_losses == pytest.approx(one_losses, rel=1e-6)
    start = _model().state_dict()
    for name, tensor in one.state_dict().items():
        assert not torch.equal(tensor, start[name]) or "rotary" in name, name
        torch.testing.assert_close(two.state_dict()[name], tensor, rtol=1e-6, atol=1e-7)


def test_halves_of_unequal_tokens_are_weighted_by_their_share():
    batch = next(_response_batches())
    even, odd = shard(batch, 0, 2), shard(batch, 1, 2)
    assert predicted_tokens(even) + predicted_tokens(odd) == predicted_tokens(batch)
    assert predicted_tokens(even) != predicted_tokens(odd)
    model = _model()
    means = [response_loss(model, part) for part in (even, odd)]
    weighted = sum(
        2 * predicted_tokens(part) / predicted_tokens(batch) * mean
        for part, mean in zip((even, odd), means, strict=True)
    )
    whole = response_loss(model, batch)
    torch.testing.assert_close(weighted / 2, whole, rtol=1e-12, atol=0)
    assert abs(float(sum(means) / 2 - whole)) > 1e-6  # an unweighted mean would be wrong


def test_a_shard_drops_the_padding_its_rows_do_not_need():
    examples = [Example.from_parts([1, 2], [3] * length) for length in (1, 6, 2, 7)]
    batch = collate(examples, PAD)
    even = shard(batch, 0, 2)
    assert even["input_ids"].shape == (2, 2 + 2)
    assert torch.equal(even["input_ids"], batch["input_ids"][0::2, :4])
    assert shard(batch, 1, 2)["input_ids"].shape == (2, 2 + 7)


def test_one_rank_trains_in_this_process_and_no_ranks_is_refused():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    losses = train_steps(model, _response_batches, SCHEDULE, "one", response_loss)
    assert len(losses) == SCHEDULE.steps
    assert any(not torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="at least 1"):
        train_steps(model, _response_batches, SCHEDULE, "none", response_loss, ranks=0)

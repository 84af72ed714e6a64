"""The fine-tuning loss shortcut computes exactly the plain response-only loss."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dammerge.data.examples import Example
from dammerge.family.train import (
    IGNORE_INDEX,
    collate,
    interleaved_batches,
    response_loss,
    shared_prefix_length,
)

PAD = 0


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def _batch(prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
    examples = [Example.from_parts(p, r) for p, r in zip(prompts, responses, strict=True)]
    return collate(examples, PAD)


def _loss_and_grads(model, loss_fn, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def _plain(model, batch):
    """The textbook response-only loss: logits everywhere, shifted labels, ignored prompt."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def test_shared_prefix_is_skipped_without_changing_loss_or_gradients():
    preamble = [5, 6, 7, 8, 9, 10]
    batch = _batch(
        [[*preamble, 11, 12], [*preamble, 13], [*preamble, 14, 15, 16, 17]],
        [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2]],  # unequal lengths: right padding
    )
    assert shared_prefix_length(batch) == len(preamble)
    model = _model()
    expected_loss, expected_grads = _loss_and_grads(model, _plain, batch)
    loss, grads = _loss_and_grads(model, response_loss, batch)
    assert abs(loss - expected_loss) < 1e-9
    # Llama's RMSNorm and rotary tables compute in float32 even in a float64 model, so the two
    # orders of summation agree to float32 rounding, not float64's.
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_rows_without_a_common_start_take_the_plain_path():
    batch = _batch([[5, 6, 7], [8, 6, 7]], [[20, 2], [21, 22, 2]])
    assert shared_prefix_length(batch) == 0
    model = _model()
    assert abs(_plain(model, batch).item() - response_loss(model, batch).item()) < 1e-9


def test_prefix_stops_before_the_position_that_predicts_the_first_response_token():
    # Identical rows: every token is shared, but the last prompt position predicts a label.
    batch = _batch([[5, 6, 7, 8], [5, 6, 7, 8]], [[20, 2], [20, 2]])
    assert shared_prefix_length(batch) == 3
    # The shortest prompt bounds the prefix even when a longer one shares more tokens.
    batch = _batch([[5, 6], [5, 6, 7, 8]], [[7, 2], [20, 2]])
    assert shared_prefix_length(batch) == 1
    assert (batch["labels"][0, :2] == IGNORE_INDEX).all()
    model = _model()
    assert abs(_plain(model, batch).item() - response_loss(model, batch).item()) < 1e-9


def test_frozen_parts_keep_the_base_values_and_the_rest_trains():
    from dammerge.family.train import Schedule, freeze, run_steps

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model, ("embeddings", "lm_head", "norms"))
    batch = _batch([[1, 2, 3, 4], [1, 2, 5, 6]], [[7, 8], [9, 10, 11]])
    run_steps(model, iter([batch] * 3), Schedule(steps=3, batch=2, lr=1e-2), "t", response_loss)
    after = model.state_dict()
    frozen = [
        k for k in after if "embed_tokens" in k or "lm_head" in k or k.endswith("norm.weight")
    ]
    # every norm of a Llama layer and the final one, the embeddings and the output projection
    assert len(frozen) == 2 * 2 + 1 + 2
    for key, value in after.items():
        assert torch.equal(value, before[key]) == (key in frozen), key
    freeze(model, ())
    assert all(p.requires_grad for p in model.parameters())


def test_interleaved_batches_take_every_nth_batch_from_the_other_stream():
    own, other = iter(range(100)), iter(range(-1, -100, -1))
    taken = list(itertools.islice(interleaved_batches(own, other, 3), 9))
    # positions 3, 6, 9 (1-based) rehearse; the own stream continues where it stopped
    assert taken == [0, 1, -1, 2, 3, -2, 4, 5, -3]
    assert list(itertools.islice(interleaved_batches(iter("abc"), iter("xyz"), 0), 3)) == [
        "a",
        "b",
        "c",
    ]
    with pytest.raises(ValueError, match="at least 2"):
        next(interleaved_batches(iter("a"), iter("x"), 1))

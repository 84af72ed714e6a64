"""Training loops of the family: pre-training of the base, full fine-tuning of specialists.

Plain PyTorch on purpose (no Trainer): the loops are short, deterministic (all randomness from
explicit seeds, single process, fixed thread count) and fast on 2 CPU cores. Pre-training packs
the corpus into fixed-length rows (no padding); fine-tuning buckets examples by length so a
batch pads to its own longest example, and puts the loss on the response tokens only, which is
how Alpaca-style specialists are trained and how DAM's data-informed objective reads them.

Fine-tuning computes exactly the usual response-only cross-entropy, but skips work that cannot
change it (``response_loss``): the Alpaca preamble that every row of a batch starts with is run
once, not once per row, and the vocabulary projection is applied only where a response token is
predicted. Together that saves about a third of a fine-tuning step on the family's data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dammerge.data.examples import Example
from dammerge.templates import alpaca_prompt

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]
LossFn = Callable[[LlamaForCausalLM, Batch], torch.Tensor]
Item = TypeVar("Item")


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a family model (all family models share them)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 512


@dataclass(frozen=True)
class Schedule:
    """One training phase: steps, batch rows, peak learning rate and weight decay."""

    steps: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.1


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama with an untied ``lm_head`` (DAM merges it separately)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _lr_at(step: int, schedule: Schedule) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    warm = max(1, int(schedule.warmup * schedule.steps))
    if step < warm:
        return schedule.lr * (step + 1) / warm
    progress = (step - warm) / max(1, schedule.steps - warm)
    floor = schedule.min_lr_ratio
    return schedule.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# Parts of a family model that a fine-tune may leave as they are, by a substring of their names.
FREEZABLE = {"embeddings": "embed_tokens", "lm_head": "lm_head", "norms": "norm"}


def freeze(model: torch.nn.Module, parts: Sequence[str]) -> None:
    """Train every parameter except those of ``parts`` (keys of ``FREEZABLE``)."""
    markers = [FREEZABLE[part] for part in parts]
    for name, param in model.named_parameters():
        param.requires_grad_(not any(marker in name for marker in markers))


def _optimizer(model: torch.nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with no weight decay on norms (1-D tensors), as
    usual for transformers."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": schedule.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def causal_lm_loss(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    """The model's own next-token loss over every labelled position (pre-training)."""
    return model(**batch).loss


def run_steps(
    model: LlamaForCausalLM,
    batches: Iterator[Batch],
    schedule: Schedule,
    description: str,
    loss_fn: LossFn = causal_lm_loss,
    position: int | None = None,
) -> list[float]:
    """Train ``model`` for ``schedule.steps`` batches; returns the loss of every step
    (``position``: the progress bar's line, where several trainings run at once)."""
    model.train()
    optimizer = _optimizer(model, schedule)
    losses: list[float] = []
    bar = tqdm(range(schedule.steps), desc=description, unit="step", leave=False, position=position)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, schedule)
        loss = loss_fn(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    return losses


# --------------------------------------------------------------------------- pre-training


def pack_corpus(
    paragraphs: Sequence[str], tokenizer: PreTrainedTokenizerFast, seq_len: int
) -> torch.Tensor:
    """Token ids of the corpus, EOS between paragraphs, cut into rows of ``seq_len``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(paragraphs)):
        ids.extend(encoding.ids)
        ids.append(eos)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def pretraining_batches(rows: torch.Tensor, batch: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled batches of packed rows (a new seeded permutation each epoch)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            chunk = rows[order[start : start + batch]]
            yield {"input_ids": chunk, "labels": chunk}


# --------------------------------------------------------------------------- fine-tuning


def tokenize_examples(
    records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerFast, max_len: int
) -> list[Example]:
    """Alpaca prompt and response + EOS of each record, tokenised separately (the response is
    the target).

    Separate tokenisation guarantees that the prompt tokens are exactly those the evaluator
    feeds at generation time (``tokenizer(prompt)``). Over-long examples are cut from the end.
    """
    backend = tokenizer.backend_tokenizer
    prompts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records]
    prompt_ids = backend.encode_batch(prompts)
    response_ids = backend.encode_batch([r["output"] for r in records])
    eos = tokenizer.eos_token_id
    examples = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        response = [*r.ids, eos][: max(1, max_len - len(p.ids))]
        examples.append(Example.from_parts(p.ids[: max_len - len(response)], response))
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded batch; labels are the response tokens, everything else ignored."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.input_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, example.response_start : len(ids)] = torch.tensor(example.response_ids)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def finetuning_batches(
    examples: Sequence[Example], batch: int, pad_id: int, seed: int, bucket: int = 16
) -> Iterator[Batch]:
    """Endless length-bucketed batches: shuffle, sort within windows of ``bucket`` batches.

    Sorting only within a window keeps the batches' order random while each batch holds
    examples of similar length, so padding stays small.
    """
    rng = random.Random(seed)
    indices = list(range(len(examples)))
    while True:
        rng.shuffle(indices)
        batches = []
        window = batch * bucket
        for start in range(0, len(indices), window):
            chunk = sorted(indices[start : start + window], key=lambda i: len(examples[i]))
            batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
        rng.shuffle(batches)
        for chunk in batches:
            if len(chunk) == batch:
                yield collate([examples[i] for i in chunk], pad_id)


def interleaved_batches(own: Iterator[Item], other: Iterator[Item], every: int) -> Iterator[Item]:
    """Batches of ``own``, except that every ``every``-th one (the ``every``-th, the
    ``2 * every``-th, ...) comes from ``other``; ``every`` of 0 means ``own`` alone.

    The fine-tunes of the near regime rehearse the warm start this way (see ``NearRecipe``).
    """
    if every < 0 or every == 1:
        raise ValueError(f"every must be 0 or at least 2, not {every}")
    step = 0
    while True:
        step += 1
        yield next(other) if every and step % every == 0 else next(own)


def shared_prefix_length(batch: Batch) -> int:
    """Leading tokens that every row shares and whose outputs no label needs.

    Hidden states of a causal model at those positions depend on those tokens alone, so they
    are the same in every row. The length stops one token before the earliest response token,
    because the position in front of a label is where that label is predicted.
    """
    ids = batch["input_ids"]
    common = int((ids == ids[:1]).all(dim=0).long().cumprod(dim=0).sum())
    labelled = batch["labels"] != IGNORE_INDEX
    first_label = int(
        torch.where(labelled.any(dim=1), labelled.long().argmax(dim=1), ids.shape[1]).min()
    )
    return max(0, min(common, first_label - 1))


def response_loss(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the response tokens, as ``model(**batch).loss`` computes it
    (in float32, or float64 for a float64 model).

    The shared prefix runs once as a batch of one; its keys and values are repeated for every
    row (autograd sums their gradients back), and the rows continue from there. Only hidden
    states that predict a response token go through ``lm_head``.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    decoder = model.get_decoder()
    prefix = shared_prefix_length(batch)
    cache = None
    if prefix:
        cache = decoder(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
    hidden = decoder(
        input_ids=ids[:, prefix:],
        attention_mask=mask,
        past_key_values=cache,
        use_cache=bool(prefix),
    ).last_hidden_state
    targets = labels[:, prefix + 1 :]
    predicts = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][predicts])
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[predicts]
    )

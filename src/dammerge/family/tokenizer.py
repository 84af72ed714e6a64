"""The family's tokenizer: byte-level BPE trained at build time with ``tokenizers``.

Digits are split one per token (with an optional leading space), as in most modern LLM
tokenizers: a 3M-parameter model learns column arithmetic far more easily when "35" is
"3","5" than when it is an opaque merged token. The tokenizer adds no BOS or EOS on its own, so
``tokenizer(prompt)`` yields exactly the prompt tokens the specialists were fine-tuned on;
training appends EOS to each response explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)

# GPT-2's pre-tokenisation regex, except that numbers are cut into single digits.
_PRETOKENIZE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; deterministic for the same texts and vocab size."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap(backend)


def wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The ``transformers`` fast tokenizer around a trained backend, with its special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write the tokenizer files that ``AutoTokenizer.from_pretrained(folder)`` reads."""
    tokenizer.save_pretrained(folder)

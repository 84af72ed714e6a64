"""Greedy generation's stop criterion against decoding the whole response."""

from __future__ import annotations

import torch


def test_stop_on_text_decides_like_decoding_the_whole_response():
    """The windowed check marks a row at the very step a full decode first shows a stop."""
    from dammerge.family.tokenizer import train_tokenizer
    from dammerge.scoring.generation import StopOnText

    # byte-level BPE that has merged the stop string and multi-byte characters into tokens
    corpus = ["answer\n### Instruction", "wörds ünïcode", "Below is a prompt."] * 50
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    stops = ["\n### ", "ünï"]
    prompt = tokenizer("Below is a prompt.")["input_ids"]
    texts = ["The answer is 12.\n### Instruction: more", "wörds ünïcode here", "no stop at all"]
    rows = [prompt + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    criterion = StopOnText(tokenizer, stops, prompt_width=len(prompt))
    stopped_at = []
    for row in rows:
        seen_full = seen_window = None
        for end in range(len(prompt) + 1, len(row) + 1):
            ids = torch.tensor([row[:end]])
            full = tokenizer.decode(row[len(prompt) : end])
            if seen_full is None and any(stop in full for stop in stops):
                seen_full = end
            if seen_window is None and bool(criterion(ids, None)[0]):
                seen_window = end
        assert seen_window == seen_full
        stopped_at.append(seen_full)
    assert stopped_at[0] is not None and stopped_at[1] is not None and stopped_at[2] is None

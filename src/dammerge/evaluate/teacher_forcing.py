"""The specialists' teacher-forced log-probs on a family's eval records, computed once.

The rows themselves come from :func:`dammerge.scoring.teacher_forcing.iter_response_logprobs`,
which gives every model (and a specialist scored against itself) exactly the same batches, so
KL(specialist ‖ specialist) is exactly 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dammerge.data.examples import Example, pad_id
from dammerge.evaluate.data import DomainData, encode_examples
from dammerge.scoring.teacher_forcing import iter_response_logprobs


@dataclass
class TeacherCache:
    """Each specialist's teacher-forced log-prob rows per domain, computed once and reused.

    Evaluating several models (or, in evolution, hundreds of candidates) needs the specialist's
    distribution on the same tokens every time; this keeps it in memory, keyed by domain,
    specialist folder and the exact token ids, so a different tokenizer or record subset is
    never served stale rows. Memory: response tokens × vocabulary × 4 bytes per domain.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 16
    progress: bool = True
    _rows: dict[tuple, list[torch.Tensor] | None] = field(default_factory=dict, repr=False)

    def rows(
        self, domain: DomainData, tokenizer: Any, *, progress: bool | None = None
    ) -> list[torch.Tensor] | None:
        """The specialist's log-prob rows for the domain's records, tokenized by ``tokenizer``.

        None when the domain has no specialist, or when the specialist's vocabulary differs
        from ``tokenizer``'s (the two distributions would not be over the same tokens).
        ``progress`` overrides the cache's own setting for this call (a caller whose own bar
        is open passes False: a second bar beneath it would be a second line).
        """
        if domain.specialist_dir is None:
            return None
        examples = encode_examples(tokenizer, domain.records)
        key = (domain.name, str(Path(domain.specialist_dir).resolve()), _ids_key(examples))
        if key not in self._rows:
            shown = self.progress if progress is None else progress
            self._rows[key] = self._compute(domain, examples, tokenizer.get_vocab(), shown)
        return self._rows[key]

    def _compute(
        self, domain: DomainData, examples: list[Example], vocab: dict[str, int], progress: bool
    ) -> list[torch.Tensor] | None:
        from dammerge.evaluate.loading import load_model

        model, tokenizer = load_model(domain.specialist_dir, device=self.device, dtype=self.dtype)
        if tokenizer.get_vocab() != vocab:
            warnings.warn(
                f"{domain.specialist_dir} has a different vocabulary: no KL for {domain.name}",
                stacklevel=2,
            )
            return None
        rows: list[torch.Tensor] = [torch.empty(0)] * len(examples)
        desc = f"specialist {domain.name}"
        with _progress(len(examples), desc, progress) as bar:
            for index, logprobs in iter_response_logprobs(
                model,
                examples,
                pad=pad_id(tokenizer),
                batch_size=self.batch_size,
                on_batch=bar.update,
            ):
                rows[index] = logprobs
        del model
        return rows


def _ids_key(examples: list[Example]) -> int:
    return hash(tuple((tuple(e.input_ids), tuple(e.target_mask)) for e in examples))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, leave=False, delay=0.5)

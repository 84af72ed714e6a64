"""The visiting order of each source's examples during learned merging.

Records are read, templated and tokenised by :mod:`dammerge.data` (examples truncated to
``max_length``, never padded; batches padded to their longest member: with batch size 1, the
paper's default, there is no padding at all). The order in which examples are visited is a pure
function of (seed, source, step): resuming at step k needs no iterator state, only k, and
reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import hashlib
import json

import torch

from dammerge.data.examples import Batch, Example, collate


class SourceData:
    """The encoded examples of one source and their deterministic visiting order."""

    def __init__(
        self, examples: list[Example], *, seed: int, source: int, batch_size: int, pad_id: int
    ) -> None:
        self.examples = examples
        self.seed, self.source = seed, source
        self.batch_size, self.pad_id = batch_size, pad_id
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.source * 10_007 + epoch) % (2**63 - 1)
            )
            self._orders = {epoch: torch.randperm(len(self), generator=generator).tolist()}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of ``step``'s batch (a fresh shuffle every pass over the data)."""
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, position = divmod(k, len(self))
            out.append(self._order(epoch)[position])
        return out

    def batch(self, step: int) -> Batch:
        indices = self.indices(step)
        return collate([self.examples[i] for i in indices], indices, self.pad_id)

    def token_count(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(json.dumps([example.input_ids, example.target_mask]).encode())
        return digest.hexdigest()

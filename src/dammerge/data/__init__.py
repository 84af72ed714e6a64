"""The data floor shared by learned merging, evolutionary search and evaluation.

One path from a recipe's ``dataset:`` block to token batches, used by every consumer so that a
dataset means the same wherever it is named:

- :mod:`.spec` — :class:`~dammerge.data.spec.DatasetSpec`, the ``dataset:`` block (template
  ``alpaca`` | ``chat`` | ``raw``, path, field mapping, samples, split);
- :mod:`.records` — reading records (JSONL, JSON, CSV, Parquet, ``save_to_disk`` folders),
  checking their fields, the seeded ``samples`` subset, and the JSONL helpers;
- :mod:`.examples` — :class:`~dammerge.data.examples.Example` (token ids and target mask),
  templating and tokenising records, and :func:`~dammerge.data.examples.collate` into a
  :class:`~dammerge.data.examples.Batch`;
- :mod:`.tokenizer` — loading a model folder's tokenizer with one-line errors.

Nothing here imports another dammerge package except :mod:`dammerge.errors` and
:mod:`dammerge.templates`, so every other package may build on it.
"""

"""Scoring a model's outputs: text metrics, likelihoods, KL to a teacher, greedy generation.

Shared by the evaluator (:mod:`dammerge.evaluate`), the family builder's quality check
(:mod:`dammerge.family`), evolutionary search and learned merging, and importing none of them:

- :mod:`.metrics` — maths exact match, SQL execution, chrF (standard library and ``sacrebleu``
  only: the lm-eval export copies this file verbatim);
- :mod:`.divergence` — the one KL-to-teacher definition (temperature, direction, top-K,
  masking, reduction);
- :mod:`.likelihood` — token log-likelihoods, masked NLL and KL;
- :mod:`.teacher_forcing` — teacher-forced log-prob rows of reference responses and their
  token-weighted NLL / KL totals;
- :mod:`.generation` — greedy batched generation with lm-eval's stops.
"""

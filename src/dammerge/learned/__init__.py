"""Data-informed merging: DAM and AdaMerging as presets of one learned-merge engine.

The registry (:mod:`dammerge.registry`) routes ``merge_method: dam`` and ``adamerging`` to
:func:`dammerge.learned.run.run_learned_merge`, each with its preset. The pieces, one concern
per module:

- :mod:`.functional` — the merged linear autograd function (no saved merged weight);
- :mod:`.layers` — merge modules (frozen weight stores, float32 coefficients as parameters);
- :mod:`.model` — building the merge module from checkpoints, teacher mode, folding;
- :mod:`.losses` — KL / MSE / entropy objectives and cosine / L1 / L2 regularisers;
- :mod:`.data` — each source's deterministic visiting order (reading, templating and
  tokenising the datasets is :mod:`dammerge.data`'s);
- :mod:`.teachers` — teacher logits on the fly or precomputed top-K on disk;
- :mod:`.settings` — the validated ``training:`` block; :mod:`.presets` — named presets;
- :mod:`.train` — the training loop, checkpoints and resume;
- :mod:`.export` — the standard checkpoint plus ``dam_coefficients.safetensors``;
- :mod:`.inspect` — coefficient plots; :mod:`.run` — the whole path, validated up front.
"""

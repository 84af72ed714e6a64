"""Named presets: the two methods and the seven objective configurations of the paper's Table 3.

Precedence when the ``training:`` block is resolved: the method's preset (the registry binds
:data:`DAM` to ``merge_method: dam`` and :data:`ADAMERGING` to ``adamerging``), then the
ablation preset named by ``training.preset``, then every key the user wrote. So

```yaml
merge_method: dam
training: {preset: kl+cosine+reg, lambda_l1: 1.0e-5}
```

is DAM's parametrisation with the KL + cosine + L1/L2 objective and a stronger L1 term.

Regulariser strengths follow the reference code's defaults: λ_cos = 0.01 (mean pairwise cosine),
λ_1 = 1e-6 and λ_2 = 1e-5 (sums over all coefficients).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LAMBDA_COS = 0.01
LAMBDA_L1 = 1e-6
LAMBDA_L2 = 1e-5

# DAM (Gauthier-Caron et al., 2024): full weights, one coefficient per input column, KL + cosine.
DAM: dict[str, Any] = {
    "parametrization": "full",
    "granularity": "column",
    "objective": "kl",
    "lambda_cos": LAMBDA_COS,
    "init": "uniform",
    "activation": "none",
    "clamp": False,
}

# AdaMerging (Yang et al., 2023): task vectors, one coefficient per layer, entropy, [0, 1].
ADAMERGING: dict[str, Any] = {
    "parametrization": "task_vectors",
    "granularity": "layer",
    "objective": "entropy",
    "lambda_cos": 0.0,
    "init": 0.3,
    "activation": "none",
    "clamp": True,
}

_NO_REG = {"lambda_l1": 0.0, "lambda_l2": 0.0}
_REG = {"lambda_l1": LAMBDA_L1, "lambda_l2": LAMBDA_L2}

ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "kl": {"objective": "kl", "lambda_cos": 0.0, **_NO_REG},
    "kl+reg": {"objective": "kl", "lambda_cos": 0.0, **_REG},
    "kl+cosine": {"objective": "kl", "lambda_cos": LAMBDA_COS, **_NO_REG},
    "kl+cosine+reg": {"objective": "kl", "lambda_cos": LAMBDA_COS, **_REG},
    "mse+cosine": {"objective": "mse", "lambda_cos": LAMBDA_COS, **_NO_REG},
    "entropy": {"objective": "entropy", "lambda_cos": 0.0, **_NO_REG},
    "entropy+cosine": {"objective": "entropy", "lambda_cos": LAMBDA_COS, **_NO_REG},
}
"""The paper's Table 3, in its order (each run over 3 seeds there)."""


def resolve_training(
    method_preset: Mapping[str, Any], user: dict[str, Any] | None
) -> dict[str, Any]:
    """Method preset < ablation preset < the user's keys (unknown names are left to validation)."""
    user = dict(user or {})
    merged: dict[str, Any] = dict(method_preset)
    preset = user.get("preset")
    if isinstance(preset, str) and preset in ABLATION_PRESETS:
        merged.update(ABLATION_PRESETS[preset])
    merged.update(user)
    return merged

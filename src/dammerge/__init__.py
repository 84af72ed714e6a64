"""dammerge: merge language models fine-tuned from one base.

Data-free methods (linear / Model Soups, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP,
Model Stock) and data-informed ones led by DAM. The Python API mirrors the CLI::

    import dammerge
    dammerge.merge("recipe.yaml", "out/merged")

The public names are imported on first use, so ``import dammerge`` (and the command line's
``--help``) does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["DammergeError", "MergeConfig", "__version__", "merge"]

if TYPE_CHECKING:
    from dammerge.config import MergeConfig
    from dammerge.dispatch import merge
    from dammerge.errors import DammergeError


def __getattr__(name: str) -> Any:
    """``merge``, ``MergeConfig`` and ``DammergeError``, imported when first asked for."""
    if name == "merge":
        from dammerge.dispatch import merge

        return merge
    if name == "MergeConfig":
        from dammerge.config import MergeConfig

        return MergeConfig
    if name == "DammergeError":
        from dammerge.errors import DammergeError

        return DammergeError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""dammerge: merge language models fine-tuned from one base.

Data-free methods (linear / Model Soups, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP,
Model Stock) and data-informed ones led by DAM. The Python API mirrors the CLI::

    import dammerge
    dammerge.merge("recipe.yaml", "out/merged")
"""

__version__ = "0.1.0"

from dammerge.config import MergeConfig
from dammerge.dispatch import merge
from dammerge.errors import DammergeError

__all__ = ["DammergeError", "MergeConfig", "__version__", "merge"]

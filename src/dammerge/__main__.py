"""``python -m dammerge``: the ``dammerge`` command line.

This is also what torchrun launches on every rank:
``torchrun --nproc-per-node K -m dammerge merge dam.yaml OUT`` (see docs/distributed.md).
"""

from dammerge.cli import main

if __name__ == "__main__":
    main()

"""The visiting order of a source's examples during learned merging."""

from __future__ import annotations

from dammerge.data.examples import Example
from dammerge.learned.data import SourceData


def test_visiting_order_is_a_function_of_the_step():
    examples = [Example([i, i], [True, True]) for i in range(5)]
    data = SourceData(examples, seed=3, source=1, batch_size=2, pad_id=0)
    epoch = [i for step in range(5) for i in data.indices(step)]
    assert sorted(epoch[:5]) == list(range(5)) and sorted(epoch[5:]) == list(range(5))
    again = SourceData(examples, seed=3, source=1, batch_size=2, pad_id=0)
    assert again.indices(4) == data.indices(4) and again.indices(0) == data.indices(0)
    other = SourceData(examples, seed=3, source=2, batch_size=2, pad_id=0)
    assert [other.indices(s) for s in range(3)] != [data.indices(s) for s in range(3)]

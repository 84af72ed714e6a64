"""reuse_freed_memory: a large tensor freed inside the block is reused without page faults."""

from __future__ import annotations

import resource

import pytest
import torch

from dammerge import memory

PAGES = 64 * 2**20 // 4096  # a 64 MiB tensor: above glibc's largest mmap threshold (32 MiB)

needs_glibc = pytest.mark.skipif(memory._glibc() is None, reason="needs glibc's mallopt")


def huge_pages_always() -> bool:
    """With transparent huge pages on for every mapping, a fresh 64 MiB takes only ~32 faults."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAMMERGE_REUSE_MEMORY", raising=False)


def faults_of_second_allocation() -> int:
    """Minor page faults of writing a fresh 64 MiB tensor right after freeing another."""
    first = torch.empty(PAGES * 1024, dtype=torch.float32)
    first.fill_(1.0)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.empty(PAGES * 1024, dtype=torch.float32)
    second.fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


def faults_in_steady_state(warmup: int = 4) -> int:
    """As in a training loop: the first rounds may still grow the heap (the 64-byte aligned
    requests do not always fit the chunk just freed), later rounds reuse what is there."""
    for _ in range(warmup):
        faults_of_second_allocation()
    return faults_of_second_allocation()


@needs_glibc
def test_freed_memory_is_reused_inside_the_block_only() -> None:
    with memory.reuse_freed_memory() as active:
        assert active
        inside = faults_in_steady_state()
    outside = faults_of_second_allocation()
    assert inside < PAGES // 100, f"{inside} page faults for a reused 64 MiB block"
    if not huge_pages_always():  # glibc's defaults again: a fresh mapping, every page faulted
        assert outside > PAGES // 2, (inside, outside)


@needs_glibc
def test_nested_blocks_keep_the_outer_setting_until_it_ends() -> None:
    with memory.reuse_freed_memory() as outer:
        with memory.reuse_freed_memory() as inner:
            assert outer and inner
        assert faults_in_steady_state() < PAGES // 100
    assert memory._active is False and memory._depth == 0


def test_the_environment_switch_keeps_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAMMERGE_REUSE_MEMORY", "0")
    with memory.reuse_freed_memory() as active:
        assert not active
    monkeypatch.setenv("DAMMERGE_REUSE_MEMORY", "off")
    assert not memory.enabled() and not memory.available()
    monkeypatch.setenv("DAMMERGE_REUSE_MEMORY", "1")
    assert memory.enabled()
    assert memory.available() == (memory._glibc() is not None)


def test_an_error_inside_the_block_restores_the_allocator() -> None:
    with pytest.raises(RuntimeError), memory.reuse_freed_memory():
        raise RuntimeError("boom")
    assert memory._active is False and memory._depth == 0

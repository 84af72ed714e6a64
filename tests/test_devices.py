"""dammerge.devices: a --device string as a usable device, and the pinned-memory settings a
CUDA device gets (checked here with torch.cuda's answers stubbed: CI has no GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from dammerge import devices
from dammerge.devices import ALLOCATOR_SETTINGS, PINNED_BY_REGISTERING, resolve_device
from dammerge.errors import DammergeError


@pytest.fixture
def no_allocator_settings(monkeypatch):
    for name in ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_gpu(monkeypatch, no_allocator_settings):
    """torch.cuda answering as on a machine with one GPU that nothing has used yet."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


def test_a_cpu_device_leaves_torchs_settings_alone(no_allocator_settings):
    assert resolve_device("cpu") == torch.device("cpu")
    assert not any(os.environ.get(name) for name in ALLOCATOR_SETTINGS)


def test_a_cuda_device_pins_host_memory_by_registering(fake_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == PINNED_BY_REGISTERING


def test_the_users_allocator_settings_win(fake_gpu, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    resolve_device("cuda")
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_nothing_changes_once_cuda_is_initialised(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    devices.pin_host_memory_by_registering()
    assert not any(os.environ.get(name) for name in ALLOCATOR_SETTINGS)


@pytest.mark.parametrize(
    "device, message",
    [("cuda:3", "only 1 CUDA device"), ("tpu", "unknown device")],
)
def test_bad_devices_are_one_line_errors(fake_gpu, device, message):
    with pytest.raises(DammergeError, match=message):
        resolve_device(device)

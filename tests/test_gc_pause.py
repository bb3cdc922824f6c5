"""The collector is paused for a call and given back as it was, errors included."""
import gc

import pytest
import torch

import prunec
from prunec.gc_pause import gc_paused


def test_paused_inside_and_restored_after():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause leaves the outer one in force
    assert gc.isenabled()


def test_restored_after_an_error():
    @gc_paused()
    def boom():
        raise ValueError("x")
    with pytest.raises(ValueError):
        boom()
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_compile_gives_the_collector_back():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    prunec.compile(model, (torch.randn(1, 4),), "prune-channels{ratio=0.5}")
    assert gc.isenabled()

"""How `senderd once` starts: the garbage collector paused while it loads, and the modules it loads."""

from __future__ import annotations

import gc

import pytest

from senderd.cli import StartupCollection


@pytest.mark.parametrize("started", [False, True])
def test_the_collector_is_back_as_it_was_after_a_paused_start(started: bool) -> None:
    startup = StartupCollection()
    assert gc.isenabled()
    with startup.paused():
        assert not gc.isenabled()
        if started:
            startup.started()
            assert gc.isenabled()
            assert gc.get_freeze_count() > 0
            startup.started()  # a second call changes nothing
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_command_that_does_not_pause_leaves_the_collector_alone() -> None:
    startup = StartupCollection()
    with startup.paused(False):
        assert gc.isenabled()
        startup.started()
        assert gc.get_freeze_count() == 0
    assert gc.isenabled()


def test_a_collector_disabled_by_the_caller_stays_disabled() -> None:
    startup = StartupCollection()
    gc.disable()
    try:
        with startup.paused():
            startup.started()
            assert not gc.isenabled() and gc.get_freeze_count() == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_during_the_start_puts_the_collector_back() -> None:
    startup = StartupCollection()

    def failing_start() -> None:
        with startup.paused():
            startup.started()
            raise RuntimeError("start failed")

    with pytest.raises(RuntimeError):
        failing_start()
    assert gc.isenabled() and gc.get_freeze_count() == 0

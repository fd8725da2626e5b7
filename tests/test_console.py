"""What a user sees: one line per stage, third-party noise captured (and shown on failure)."""

import ctypes
import os
import sys
import warnings

import pytest

from edgemix import console
from edgemix.errors import UsageError


def _noise():
    os.write(1, b"cpuinfo-style line written by C++ to fd 1\n")
    os.write(2, b"torchao-style line written to fd 2\n")
    print("python print to sys.stdout")
    warnings.warn("a FutureWarning from a library", FutureWarning)
    libc = ctypes.CDLL(None)
    libc.printf(b"buffered C stdio line\n")  # flushed by capture_noise, before the descriptor swap


def test_noise_is_captured_and_stage_lines_get_through(capfd):
    with console.capture_noise():
        _noise()
        console.info("[   stage] what it made  (1.0 s)")
        console.warn("the cache is not writable")
    out, err = capfd.readouterr()
    assert out == "[   stage] what it made  (1.0 s)\n"
    assert err == "warning: the cache is not writable\n"


def test_verbose_shows_everything(capfd):
    with console.capture_noise(verbose=True):
        _noise()
        console.info("stage line")
    out, err = capfd.readouterr()
    assert "cpuinfo-style line" in out and "stage line" in out and "torchao-style line" in err


def test_an_internal_failure_replays_the_captured_output(capfd):
    with pytest.raises(RuntimeError):
        with console.capture_noise():
            os.write(2, b"the library said why\n")
            raise RuntimeError("bug")
    _, err = capfd.readouterr()
    assert "the library said why" in err and "captured" in err


def test_a_user_error_does_not_replay_noise(capfd):
    with pytest.raises(UsageError):
        with console.capture_noise():
            os.write(2, b"irrelevant library chatter\n")
            raise UsageError("bad --target")
    _, err = capfd.readouterr()
    assert "irrelevant library chatter" not in err
    # the descriptors are restored afterwards
    os.write(1, b"after\n")
    sys.stdout.flush()
    assert capfd.readouterr().out == "after\n"


def test_quiet_for_one_block_only(capfd):
    with console.quieted(True):
        console.info("hidden")
    console.info("shown")
    assert capfd.readouterr().out == "shown\n"

"""Per-stage peak memory (edgemix.memory): the figures the report's stages and the scale table quote."""

import os
from pathlib import Path

import numpy as np
import pytest

from edgemix import memory
from edgemix.pipeline import Stages

STATUS = """Name:\tpython
VmPeak:\t 2097152 kB
VmHWM:\t  524288 kB
VmRSS:\t  262144 kB
"""


def test_status_fields_are_read_in_mb():
    assert memory.status_mb("VmHWM", STATUS) == 512.0 and memory.status_mb("VmRSS", STATUS) == 256.0
    assert memory.status_mb("VmSwap", STATUS) is None and memory.status_mb("VmHWM", "VmHWM:\tmany kB") is None


needs_reset = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                 reason="this process cannot reset its VmHWM (not Linux, or /proc/self/clear_refs "
                                        "not writable)")


@pytest.fixture
def owned(monkeypatch):
    monkeypatch.setattr(memory, "_owned", True)  # as the edgemix command does


def _touch(mb: int) -> None:
    a = np.ones(mb * 2**20 // 8)  # written, so resident
    assert a.sum() > 0
    del a  # a large array is its own mapping: freed back to the kernel here


@needs_reset
def test_each_stage_reports_its_own_peak_and_the_build_the_largest(owned):
    stages = Stages()
    _touch(300)
    stages("big", "300 MB touched", 0.1)
    stages("small", "nothing", 0.1)
    big, small = (row["peak_rss_mb"] for row in stages.rows)
    # the second stage allocated nothing: its peak is what stayed resident, not the first stage's
    assert big - small > 250, stages.rows
    assert memory.process_peak_rss_mb() >= big


def test_inside_a_callers_process_the_high_water_mark_is_left_alone(monkeypatch):
    """edgemix.build from a user's script or notebook: their process's peak stays what it was."""
    monkeypatch.setattr(memory, "_owned", False)
    _touch(300)
    before = memory.status_mb("VmHWM")
    stages = Stages()
    stages("any", "x", 0.1)
    assert memory.status_mb("VmHWM") >= before and stages.rows[0]["peak_rss_mb"] is None
    assert memory.process_peak_rss_mb() >= before - 0.1  # rounded to 0.1 MB


def test_without_a_resettable_mark_no_stage_claims_a_peak(owned, monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    stages = Stages()
    stages("any", "x", 0.1)
    assert stages.rows[0]["peak_rss_mb"] is None


def test_the_edgemix_command_owns_its_process():
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['edgemix', '--help']\nfrom edgemix import cli, memory\ntry:\n    cli.main()\n"
            "except SystemExit:\n    pass\nprint('owned', memory._owned)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip().endswith("owned True")

"""Per-stage peak memory (edgemix.memory): the figures the report's stages and the scale table quote."""

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


needs_reset = pytest.mark.skipif(not memory.reset_peak(), reason="the kernel does not let this process reset VmHWM "
                                                                  "(not Linux, or /proc/self/clear_refs not writable)")


def _touch(mb: int) -> None:
    a = np.ones(mb * 2**20 // 8)  # written, so resident
    assert a.sum() > 0
    del a  # a large array is its own mapping: freed back to the kernel here


@needs_reset
def test_each_stage_reports_its_own_peak_and_the_build_the_largest():
    stages = Stages()
    _touch(300)
    stages("big", "300 MB touched", 0.1)
    stages("small", "nothing", 0.1)
    big, small = (row["peak_rss_mb"] for row in stages.rows)
    # the second stage allocated nothing: its peak is what stayed resident, not the first stage's
    assert big - small > 250, stages.rows
    assert memory.process_peak_rss_mb() >= big


def test_without_a_resettable_mark_no_stage_claims_a_peak(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    stages = Stages()
    stages("any", "x", 0.1)
    assert stages.rows[0]["peak_rss_mb"] is None

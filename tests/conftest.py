import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `edgemix` console script; returns CompletedProcess (text)."""
    exe = Path(sys.executable).with_name("edgemix")
    e = dict(os.environ, CI="true")
    e.update(env or {})
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO,
                          env=e, timeout=timeout)


def assert_clean_error(proc, code, *needles):
    """A user mistake: the documented exit code, the needles in stderr, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)

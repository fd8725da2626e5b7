import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _build_cache(tmp_path_factory):
    """One fresh build cache for the session (never the user's ~/.cache/edgemix); CLI subprocesses
    inherit it through the environment. The compiled native runners, their ExecuTorch SDKs and the
    arm64 wheel are shared with the default cache: they are keyed by source, compiler and version,
    and rebuilding them (a 17 MB download among it) every session would test nothing more."""
    old = os.environ.get("EDGEMIX_CACHE_DIR")
    fresh = tmp_path_factory.mktemp("edgemix-cache")
    shared = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgemix"
    for kind in ("runners", "sdk", "wheels"):
        try:
            (shared / kind).mkdir(parents=True, exist_ok=True)
            (fresh / kind).symlink_to(shared / kind, target_is_directory=True)
        except OSError:
            pass  # an unwritable home: this test run builds its own
    os.environ["EDGEMIX_CACHE_DIR"] = str(fresh)
    yield
    if old is None:
        os.environ.pop("EDGEMIX_CACHE_DIR", None)
    else:
        os.environ["EDGEMIX_CACHE_DIR"] = old


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


@pytest.fixture
def read_only():
    """make(folder): bind-mounts ``folder`` read-only onto itself, a real read-only file system
    (EROFS) that root cannot write through either, unlike chmod; unmounted after the test."""
    mounted = []

    def make(folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for cmd in (["mount", "--bind", folder, folder], ["mount", "-o", "remount,ro,bind", folder]):
            p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
            if p.returncode != 0:
                if mounted or cmd[1] == "-o":
                    subprocess.run(["umount", str(folder)], capture_output=True)
                pytest.skip(f"needs root and mount(8) to make a read-only file system: {p.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], capture_output=True)

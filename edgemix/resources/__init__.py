"""Everything a build needs that is not code ships inside the package and is found through
importlib.resources, so a wheel installed anywhere works from any folder:

    targets/   device profiles (TOML), one file per target
    calib/     calibration recipes (TOML)
    data/      the stratified Fashion-MNIST sample (IDX, gzipped)
    weights/   shipped default checkpoints
    runner/    the native ExecuTorch runner's C++ source (compiled on first use)
    device/    the device-side benchmark script (copied to a Jetson; runs without edgemix)

edgemix is installed as files, never zip-imported (torch and its extensions cannot be either), so a
resource is an ordinary path; :func:`path` says so once instead of every caller assuming it.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import resources
from pathlib import Path


def path(*parts: str) -> Path:
    """The file or folder ``parts`` inside edgemix's resources, as a filesystem path."""
    return Path(str(resources.files(__name__).joinpath(*parts)))


@functools.cache
def device_script():
    """The device-side benchmark script as a module: it runs on devices without edgemix, so what the
    host shares with it (the onnxruntime session options) is defined there and imported from there."""
    file = path("device", "edgemix_device_runner.py")
    spec = importlib.util.spec_from_file_location("edgemix_device_runner", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

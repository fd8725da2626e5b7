"""Host runner: the same device script as the ssh runner, run here as a subprocess.

A subprocess rather than in-process so that the measured process holds only the runtime (not
edgemix, typer and a loaded torch build graph), its thread pool settings do not leak into the
caller, and the host is measured exactly like a remote device is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgemix.errors import DeviceError
from edgemix.runners.protocol import DEVICE_SCRIPT, Artifact, Runner, Settings, device_args, parse_device_output


class LocalRunner(Runner):
    kind = "local"
    endpoint = "localhost"
    in_place = True

    def __init__(self, python: str | None = None, cache_dir: Path | None = None):
        self.python = python or sys.executable
        self.cache_dir = cache_dir or Path.home() / ".cache" / "edgemix" / "engines"

    def check(self) -> None:
        if not DEVICE_SCRIPT.is_file():
            raise DeviceError(f"missing binary: the device runner script {DEVICE_SCRIPT} is not in this checkout")

    def payload(self, art: Artifact, settings: Settings, workdir: Path) -> list[tuple[Path, str, str]]:
        return [(path, path.name, art.sha256[role]) for role, path in art.paths.items()]

    def execute(self, art: Artifact, settings: Settings) -> dict:
        ref = art.paths.get("reference_io")
        args = device_args(art, settings, str(art.model), str(ref) if ref else None, str(self.cache_dir))
        try:
            p = subprocess.run([self.python, str(DEVICE_SCRIPT), *args], capture_output=True, text=True,
                               timeout=settings.timeout_s)
        except FileNotFoundError:
            raise DeviceError(f"missing binary: the Python interpreter '{self.python}' was not found") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"timeout: the benchmark took longer than {settings.timeout_s:.0f} s",
                              hint="raise the target's runner.timeout_s or pass --timeout") from None
        return parse_device_output(p.stdout, p.stderr, p.returncode, self.endpoint, self.python)

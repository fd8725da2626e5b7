"""edgemix as users install it: a wheel, installed non-editable into a fresh virtual environment,
run from an empty folder. Everything a build reads must ship inside the package."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO


def test_wheel_installs_and_builds_from_an_empty_folder(tmp_path):
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (wheel,) = wheels.glob("edgemix-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for resource in ("targets/android-arm64.toml", "calib/default.toml", "weights/fmnist.pt",
                     "data/fashion-mnist-sample/t10k-images-idx3-ubyte.gz", "runner/edgemix_runner.cpp",
                     "device/edgemix_device_runner.py"):
        assert f"edgemix/resources/{resource}" in names, resource

    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    # The pinned stack (torch, executorch, ...) comes from this environment's site-packages through a
    # .pth line: the fresh environment reads it, but not this environment's own .pth files, so the
    # editable edgemix of the checkout stays invisible and only the installed wheel can be imported.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "pinned_stack.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, CI="true")
    where = subprocess.run([str(py), "-c", "import edgemix; print(edgemix.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(env_dir)), where

    exe = env_dir / "bin" / "edgemix"
    p = subprocess.run([str(exe), "targets", "--json"], cwd=empty, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert {"android-arm64", "jetson-orin-nano", "host-cpu"} <= set(json.loads(p.stdout))
    p = subprocess.run([str(exe), "build", "--target", "phone", "--eval-limit", "100", "--latency-runs", "5",
                        "--latency-seconds", "0"], cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((empty / "artifacts" / "fmnist_phone_int8" / "report.json").read_text())
    assert report["drift"]["samples"] == 100 and report["isa_drift"]["profiles"]  # the runner source shipped
    assert report["provenance"]["git_commit"] is None  # an installed wheel is not a checkout

"""Native ExecuTorch runners: build resources/runner/edgemix_runner.cpp for the host and for arm64, run a
``.pte`` with them (arm64 under qemu-user), and check that an emulated CPU profile can be trusted.

Why a native runner at all: the Python runtime runs the x86-64 kernels only, and an INT8 program
does not compute the same bits on every ISA (XNNPACK picks its GEMM microkernels from the CPU's
features). The runner is the C++ Module API program an app would link, built against the libraries
of the *same* executorch version the program was exported with: for the host from the installed
package, for arm64 from the ``manylinux_2_28_aarch64`` wheel (downloaded once with pip).

Everything built or downloaded lives under edgemix's cache root (``$EDGEMIX_CACHE_DIR``, default
``~/.cache/edgemix``; see edgemix.cache):
``wheels/`` (the arm64 wheel), ``sdk/executorch-<ver>-<arch>/`` (its include/ and lib/),
``runners/<arch>-et<ver>-<key>/`` (the binary with its shared libraries beside it, so the folder can
be copied to a device as is; ``key`` hashes the source, the compiler and the flags).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgemix import resources
from edgemix.errors import ToolchainError, UsageError, unknown_choice

RUNNER_SOURCE = resources.path("runner", "edgemix_runner.cpp")
# The libraries a program lowered to XNNPACK needs; they register their kernels and the delegate
# from static constructors, hence --no-as-needed (nothing references them by symbol).
RUNTIME_LIBS = ("executorch_kernels_optimized", "executorch_kernels_quantized",
                "executorch_backend_xnnpack", "executorch_threadpool", "executorch")
# The definitions the package's CMake config (executorch-config.cmake) gives its consumers.
DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED", "ET_USE_THREADPOOL")
CXXFLAGS = ("-std=c++17", "-O2", "-pthread")


@dataclass(frozen=True)
class ArchInfo:
    triplet: str  # GNU triplet: cross compiler prefix and the qemu sysroot /usr/<triplet>
    wheel_platform: str
    cross_package: str  # Debian package of the cross compiler
    elf_machine: int  # e_machine of its shared libraries, to refuse a mixed-up SDK


ARCHES = {
    "x86_64": ArchInfo("x86_64-linux-gnu", "manylinux_2_28_x86_64", "g++-x86-64-linux-gnu", 62),
    "aarch64": ArchInfo("aarch64-linux-gnu", "manylinux_2_28_aarch64", "g++-aarch64-linux-gnu", 183),
}
# A dotprod-class core as in most Android phones in use (Cortex-A76 .. A78, X1); its emulation
# passes the ISA self-test. qemu's own default, "max", enables SME, which qemu 7.2 gets wrong.
DEFAULT_CPU = "cortex-a76"
EMULATOR_PACKAGE = "qemu-user-static"


def cache_dir() -> Path:
    """edgemix's cache root (edgemix.cache.root); with the cache off, a folder of this process's own
    that is removed when it exits, so --no-cache leaves nothing behind (the runner is rebuilt)."""
    from edgemix import cache

    return cache.root() or _scratch()


@functools.cache
def _scratch() -> Path:
    import atexit

    folder = Path(tempfile.mkdtemp(prefix="edgemix-nocache-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def executorch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("executorch")
    except PackageNotFoundError:
        raise ToolchainError("the executorch Python package is not installed",
                             hint="run ./setup.sh (it installs executorch into .venv)") from None


def _check_arch(arch: str) -> ArchInfo:
    if arch not in ARCHES:
        raise unknown_choice("runner architecture", arch, ARCHES)
    return ARCHES[arch]


def _require(tool: str, package: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolchainError(f"{tool} not found on PATH ({why})",
                             hint=f"install the Debian package {package}: apt-get install {package} "
                                  f"(./setup.sh installs it)")
    return path


def compiler_for(arch: str) -> tuple[str, str]:
    """(compiler path, Debian package) for building a runner for ``arch`` on this host."""
    info = _check_arch(arch)
    if arch == host_arch():
        return _require("g++", "g++", f"it compiles the {arch} runner"), "g++"
    tool = f"{info.triplet}-g++"
    return _require(tool, info.cross_package, f"it cross-compiles the {arch} runner"), info.cross_package


def emulator_for(arch: str) -> tuple[str, dict]:
    """(qemu-user binary, environment) to run ``arch`` binaries on this host."""
    info = _check_arch(arch)
    qemu = _require(f"qemu-{arch}-static", EMULATOR_PACKAGE, f"it runs {arch} binaries on this {host_arch()} host")
    sysroot = Path("/usr") / info.triplet
    if not (sysroot / "lib").is_dir():
        # The cross compiler's runtime (libc6-<arch>-cross, libstdc++6-<arch>-cross) is the dynamic
        # loader and libraries the emulated runner needs.
        raise ToolchainError(f"{sysroot}/lib is missing: qemu has no {arch} libc/libstdc++ to load the runner with",
                             hint=f"install the Debian package {info.cross_package} (it pulls the {arch} runtime)")
    env = dict(os.environ, QEMU_LD_PREFIX=str(sysroot))
    env.pop("QEMU_CPU", None)  # the CPU is always chosen explicitly with -cpu
    return qemu, env


def check_toolchain(arch: str) -> None:
    """Fail before any work starts when ``arch`` runners can be neither built nor run here."""
    compiler_for(arch)
    if arch != host_arch():
        emulator_for(arch)


# ---- the ExecuTorch SDK (headers + shared libraries) for an architecture -----------------------

def _elf_machine(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return -1
    return int.from_bytes(head[18:20], "little")


def _valid_sdk(root: Path, arch: str) -> bool:
    lib = root / "lib" / "libexecutorch.so"
    return ((root / "include" / "executorch" / "extension" / "module" / "module.h").is_file()
            and lib.is_file() and _elf_machine(lib) == ARCHES[arch].elf_machine
            and all((root / "lib" / f"lib{name}.so").is_file() for name in RUNTIME_LIBS))


def _fetch_wheel(arch: str, version: str) -> Path:
    info = ARCHES[arch]
    wheels = cache_dir() / "wheels"
    public = version.split("+")[0]  # a local tag (1.5.1+cpu) names a build of the host wheel only
    pattern = f"executorch-{public}-*-{info.wheel_platform}.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", f"executorch=={public}", "--platform", info.wheel_platform,
           "--only-binary=:all:", "--no-deps", "--python-version", pyver, "-d", str(wheels), "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        proc = None
    found = sorted(wheels.glob(pattern))
    if proc is None or proc.returncode != 0 or not found:
        detail = "timed out after 600 s" if proc is None else (proc.stderr or proc.stdout).strip()[-800:]
        raise ToolchainError(f"could not download the executorch {version} {info.wheel_platform} wheel: {detail}",
                             hint=f"check access to PyPI, or put the wheel ({pattern}) into {wheels} yourself")
    return found[-1]


def executorch_sdk(arch: str) -> Path:
    """A folder with ExecuTorch's ``include/`` and ``lib/`` for ``arch``, matching the installed version."""
    _check_arch(arch)
    version = executorch_version()
    if arch == host_arch():
        import executorch

        installed = Path(executorch.__path__[0])
        if _valid_sdk(installed, arch):
            return installed
    sdk = cache_dir() / "sdk" / f"executorch-{version}-{arch}"
    if _valid_sdk(sdk, arch):
        return sdk
    wheel = _fetch_wheel(arch, version)
    sdk.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=sdk.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    if member.startswith(("executorch/include/", "executorch/lib/")):
                        zf.extract(member, staging)
        except zipfile.BadZipFile:
            pass  # reported below like any other unusable wheel
        unpacked = staging / "executorch"
        if not _valid_sdk(unpacked, arch):
            raise ToolchainError(f"{wheel.name} does not hold the runner's headers and {arch} libraries",
                                 hint=f"delete {wheel} and retry; the wheel may be incomplete")
        shutil.rmtree(sdk, ignore_errors=True)
        os.replace(unpacked, sdk)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sdk


# ---- building ----------------------------------------------------------------------------------

def _build_key(arch: str, compiler: str, version: str) -> str:
    if not RUNNER_SOURCE.is_file():
        raise ToolchainError(f"runner source {RUNNER_SOURCE} not found",
                             hint="reinstall edgemix: the source ships inside the package (resources/runner/)")
    cc_version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256()
    for part in (RUNNER_SOURCE.read_bytes(), cc_version.encode(), version.encode(), arch.encode(),
                 " ".join(DEFINES + CXXFLAGS + RUNTIME_LIBS).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def build_runner(arch: str = "x86_64", force: bool = False) -> Path:
    """Compile (or reuse) the runner for ``arch``; returns the binary, its libraries beside it.

    Cached per executorch version + source/compiler/flags hash; ``force`` rebuilds. Raises
    :class:`ToolchainError` (exit 3) naming the Debian package when the compiler is missing or broken.
    """
    compiler, package = compiler_for(arch)
    version = executorch_version()
    final = cache_dir() / "runners" / f"{arch}-et{version}-{_build_key(arch, compiler, version)}"
    binary = final / "edgemix_runner"
    if binary.is_file() and not force:
        return binary
    sdk = executorch_sdk(arch)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        for name in RUNTIME_LIBS:
            shutil.copy2(sdk / "lib" / f"lib{name}.so", staging / f"lib{name}.so")
        include = sdk / "include"
        cmd = [compiler, *CXXFLAGS, *(f"-D{d}" for d in DEFINES),
               "-isystem", str(include), "-isystem", str(include / "executorch/runtime/core/portable_type/c10"),
               str(RUNNER_SOURCE), "-o", str(staging / "edgemix_runner"), f"-L{staging}",
               "-Wl,--no-as-needed", *(f"-l{n}" for n in RUNTIME_LIBS), "-Wl,--as-needed",
               "-Wl,-rpath,$ORIGIN"]  # the folder is self-contained: copy it anywhere, it finds its libs
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ToolchainError(f"{compiler} did not finish building the {arch} runner in 600 s",
                                 hint="the machine may be overloaded; retry") from None
        if proc.returncode != 0:
            raise ToolchainError(f"{Path(compiler).name} failed to build the {arch} runner:\n{proc.stderr.strip()[-2000:]}",
                                 hint=f"check the Debian package {package} (reinstall it, or run ./setup.sh)")
        staging.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be copied and shared
        if force:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:
            pass  # a concurrent build put the same key in place first; its result is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


# ---- running -----------------------------------------------------------------------------------

class NativeRunError(ToolchainError):
    """The runner could not load or run a program (crash, timeout, missing kernel); exit 3."""


@dataclass
class NativeRun:
    """What one runner invocation measured. Under emulation the timings say nothing about a phone."""

    arch: str
    cpu: str | None  # the emulated CPU profile, None when native
    emulated: bool
    threads: int
    warmup: int
    iterations: int
    images: int
    batch_size: int
    run_ms: list[float]  # every timed execute() of a whole batch, in order
    median_ms: float
    median_ms_per_image: float
    load_ms: float
    method_load_ms: float
    cpu_features: list[str]
    repeatable: bool  # every iteration of a batch gave the same bits
    wall_s: float
    runner: str
    events: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("events")
        return d


def _launcher(arch: str, cpu: str | None, runner: Path | None) -> tuple[list[str], dict, str | None, Path]:
    _check_arch(arch)
    emulated = arch != host_arch()
    if cpu is not None and not emulated:
        raise UsageError(f"a CPU profile (cpu={cpu!r}) only applies to an emulated run; {arch} runs natively here")
    # the emulator is checked before a build, so a missing package is reported in a second
    qemu, env = emulator_for(arch) if emulated else (None, dict(os.environ))
    if runner is None:
        runner = build_runner(arch)
    elif not Path(runner).is_file():
        raise UsageError(f"runner {runner} does not exist")
    if not emulated:
        return [str(runner)], env, None, Path(runner)
    cpu = cpu or DEFAULT_CPU
    return [qemu, "-cpu", cpu, str(runner)], env, cpu, Path(runner)


def _invoke(cmd: list[str], env: dict, timeout: float, what: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NativeRunError(f"{what} did not finish within {timeout:.0f} s",
                             hint="emulation is ~100-400x slower than native: use fewer images or a longer timeout") from None
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 2:
        raise UsageError(f"{what} rejected its input: {proc.stderr.strip()[-1500:]}")
    if proc.returncode not in (0, 1):
        if proc.returncode < 0 or proc.returncode > 128:
            detail = f"it crashed (signal {abs(proc.returncode) % 128})"
        else:
            detail = f"exit {proc.returncode}"
        raise NativeRunError(f"{what} failed, {detail}: {proc.stderr.strip()[-1500:]}",
                             hint="a program that needs kernels the runner does not link fails here; "
                                  "see docs/native-runner.md")
    return proc, events


def run_pte(pte: str | Path, inputs: np.ndarray, arch: str = "x86_64", cpu: str | None = None, threads: int = 1,
            warmup: int = 0, iterations: int = 1, timeout: float | None = None,
            runner: str | Path | None = None) -> tuple[np.ndarray, NativeRun]:
    """Run ``pte`` on ``inputs`` (float32, N x C x H x W) with the ``arch`` runner; returns (outputs, run).

    ``arch`` other than the host's runs under ``qemu-<arch>-static -cpu <cpu>`` (default
    :data:`DEFAULT_CPU`). Inputs are fed in the program's fixed batch size; the last batch is zero-padded
    and its padding dropped, so ``outputs`` has N rows. Each batch runs ``warmup`` untimed and
    ``iterations`` timed times. ``runner`` uses a given binary instead of building one.
    """
    pte = Path(pte)
    if not pte.is_file():
        raise UsageError(f"program {pte} does not exist")
    x = np.ascontiguousarray(inputs, dtype="<f4")
    if x.ndim < 2 or x.shape[0] == 0:
        raise UsageError(f"inputs must be a non-empty batch (N x ...), got shape {tuple(x.shape)}")
    if threads < 1 or warmup < 0 or iterations < 1:
        raise UsageError("threads and iterations must be >= 1 and warmup >= 0")
    base, env, cpu, runner_path = _launcher(arch, cpu, Path(runner) if runner else None)
    emulated = cpu is not None
    if timeout is None:
        # Generous: it only has to catch a hang. Measured on 2 loaded cores: S/16 FP32 ~60 s per image
        # under qemu (softfloat), S/16 INT8 ~8 s, natively 0.05-0.2 s.
        timeout = 120 + x.shape[0] * (warmup + iterations) * (300 if emulated else 10)
    with tempfile.TemporaryDirectory(prefix="edgemix-native-") as tmp:
        inp, out = Path(tmp) / "inputs.f32", Path(tmp) / "outputs.f32"
        x.tofile(inp)
        cmd = [*base, str(pte), "--input", str(inp), "--shape", ",".join(map(str, x.shape)), "--output", str(out),
               "--threads", str(threads), "--warmup", str(warmup), "--iterations", str(iterations)]
        t0 = time.perf_counter()
        _, events = _invoke(cmd, env, timeout, f"the {arch} runner" + (f" (qemu -cpu {cpu})" if emulated else ""))
        wall = time.perf_counter() - t0
        flat = np.fromfile(out, dtype="<f4")
    load = next(e for e in events if e["event"] == "load")
    summary = next(e for e in events if e["event"] == "summary")
    outputs = flat.reshape(x.shape[0], *load["output_sizes"][1:])
    runs = [e["ms"] for e in events if e["event"] == "run" and not e["warmup"]]
    return outputs, NativeRun(
        arch=arch, cpu=cpu, emulated=emulated, threads=load["threads"], warmup=warmup, iterations=iterations,
        images=summary["images"], batch_size=summary["batch_size"], run_ms=runs, median_ms=summary["median_ms"],
        median_ms_per_image=summary["median_ms_per_image"], load_ms=load["load_ms"],
        method_load_ms=load["method_load_ms"], cpu_features=load.get("cpu_features", []),
        repeatable=summary["repeatable"], wall_s=wall, runner=str(runner_path), events=events)


@dataclass
class BundledRun:
    passed: bool
    cases: list[dict]  # one "bundled_case" event per test case: per-output max_abs, cosine, argmax_equal ...
    outputs: np.ndarray  # output 0 of every case, concatenated (rows as the program returns them)
    arch: str
    cpu: str | None


def run_bundled(bpte: str | Path, arch: str = "x86_64", cpu: str | None = None, atol: float = 1e-3,
                rtol: float = 1e-3, threads: int = 1, timeout: float = 900,
                runner: str | Path | None = None) -> BundledRun:
    """Run the test cases a BundledProgram carries and compare with its expected outputs
    (``|out - expected| <= atol + rtol * |expected|``, as torch.allclose)."""
    bpte = Path(bpte)
    if not bpte.is_file():
        raise UsageError(f"bundled program {bpte} does not exist")
    base, env, cpu, _ = _launcher(arch, cpu, Path(runner) if runner else None)
    with tempfile.TemporaryDirectory(prefix="edgemix-native-") as tmp:
        out = Path(tmp) / "bundled.f32"
        cmd = [*base, str(bpte), "--atol", repr(atol), "--rtol", repr(rtol), "--threads", str(threads),
               "--bundled-output", str(out)]
        proc, events = _invoke(cmd, env, timeout, f"the {arch} runner on {bpte.name}")
        flat = np.fromfile(out, dtype="<f4") if out.is_file() else np.zeros(0, np.float32)
    cases = [e for e in events if e["event"] == "bundled_case"]
    return BundledRun(passed=proc.returncode == 0 and all(c["pass"] for c in cases), cases=cases,
                      outputs=flat, arch=arch, cpu=cpu)


@dataclass(frozen=True)
class SelfTest:
    """Whether an (emulated) CPU computes the matrix instructions XNNPACK may pick on it correctly."""

    arch: str
    cpu: str | None
    trusted: bool
    reason: str
    cpu_features: tuple[str, ...]
    checks: tuple[tuple[str, str, int, int], ...]  # (instruction, ok|wrong|not_advertised, mismatches, elements)


@functools.lru_cache(maxsize=None)
def _selftest_cached(arch: str, cpu: str | None, runner: str) -> SelfTest:
    base, env, cpu, _ = _launcher(arch, cpu, Path(runner))
    proc, events = _invoke([*base, "--selftest"], env, 120, f"the {arch} runner's ISA self-test")
    ev = next(e for e in events if e["event"] == "selftest")
    checks = tuple((c["name"], c["status"], c["mismatches"], c["elements"]) for c in ev["checks"])
    wrong = [c for c in checks if c[1] == "wrong"]
    if wrong:
        what = ", ".join(f"{n} ({m}/{e} elements wrong)" for n, _, m, e in wrong)
        reason = (f"the emulated CPU computes {what}; XNNPACK's kernels use these instructions on this profile, "
                  "so its outputs measure the emulator, not a phone (docs/native-runner.md)")
    elif cpu is None:
        reason = "native run: nothing is emulated"
    else:
        reason = "every matrix instruction the profile advertises matches its architectural definition"
    return SelfTest(arch=arch, cpu=cpu, trusted=not wrong, reason=reason,
                    cpu_features=tuple(ev.get("cpu_features", [])), checks=checks)


def selftest(arch: str = "aarch64", cpu: str | None = None) -> SelfTest:
    """Run the runner's ISA self-test for ``arch`` (under qemu ``-cpu cpu`` when not the host's).

    A profile whose self-test fails (qemu 7.2 with SME, e.g. ``-cpu max``) must be reported as
    untrusted: its drift figures are the emulator's error. Cached per process.
    """
    return _selftest_cached(arch, cpu, str(build_runner(arch)))


@dataclass
class ProfileRun:
    """One emulated (or native) CPU profile's outputs, with whether they can be trusted."""

    cpu: str | None
    outputs: np.ndarray
    run: NativeRun
    trust: SelfTest


def run_profiles(pte: str | Path, inputs: np.ndarray, cpus: list[str], arch: str = "aarch64",
                 threads: int = 1, timeout: float | None = None) -> dict[str, ProfileRun]:
    """Run ``pte`` under each CPU profile in ``cpus`` (e.g. a phone target's list) and self-test each.

    Every profile is run and returned, trusted or not: the report shows an untrusted profile's drift
    flagged with ``trust.reason`` instead of hiding it, and the gate ignores it.
    """
    check_toolchain(arch)
    build_runner(arch)  # once, before the profiles run side by side

    def one(cpu: str) -> ProfileRun:
        outputs, run = run_pte(pte, inputs, arch=arch, cpu=cpu, threads=threads, timeout=timeout)
        return ProfileRun(cpu=cpu, outputs=outputs, run=run, trust=selftest(arch, cpu))

    # each profile is its own single-threaded qemu process: run them side by side on the host's
    # cores (S/16, 2 profiles: 10.5 s one after the other); a failure in any one is raised as is
    workers = max(1, min(len(cpus), (os.cpu_count() or 1) // max(1, threads)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(one, cpus))
    return {r.cpu: r for r in runs}

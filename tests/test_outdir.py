"""Issue 15, "nothing lost": what `edgemix build --out DIR` may replace, one build per folder, and a
swap that survives `kill -9` at its worst instant (killed there by a fault-injection hook, not by
timing). Every CLI test compares the trees before and after; the pure helpers are tested directly.
"""

import errno
import fcntl
import json
import os
import shutil
import signal

import pytest

from conftest import assert_clean_error, run_cli
from edgemix import outdir
from edgemix.errors import UsageError

FAST = ("build", "--target", "jetson", "--model", "fmnist", "--no-compare-fp32", "--latency-runs", "3",
        "--latency-seconds", "0")
X = (*FAST, "--eval-limit", "100")  # the build every test starts from
Y = (*FAST, "--eval-limit", "120")  # another fingerprint: a real rebuild, told apart by its sample count
KILLED = -signal.SIGKILL


def tree(root):
    """Every entry under root (hidden ones too): file bytes, link targets, '<dir>' for folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "<dir>"
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def report(folder):
    return json.loads((folder / "report.json").read_text())


def leftovers(out):
    """Hidden siblings of out other than its lock file, which a killed build leaves and the next one
    reuses (flock, not the file's existence, is the lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
                  and p.name != outdir.lock_path(out).name)


def only_out(out):
    return sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (args X), written into an existing EMPTY folder: accepted, nothing to lose."""
    out = tmp_path_factory.mktemp("built") / "out"
    out.mkdir()
    p = run_cli(*X, "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    return out


@pytest.fixture
def previous(built, tmp_path):
    """A private copy of the real build, so a test may break it."""
    out = tmp_path / "out"
    shutil.copytree(built, out)
    return out


def _exchange_supported(where):
    a, b = where / "xa", where / "xb"
    a.mkdir()
    b.mkdir()
    try:
        outdir.rename_exchange(a, b)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)
    return True


# ------------------------------------------------------------------------------------ CLI: item 1

def test_empty_folder_is_accepted_and_nothing_is_left_beside_it(built):
    assert report(built)["schema_version"] and report(built)["drift"]["samples"] == 100
    assert only_out(built)  # no lock file, no staging, no old
    before = tree(built.parent)
    p = run_cli(*X, "--out", built)  # unchanged: the up-to-date path still works under the lock
    assert p.returncode == 0 and "up to date" in p.stdout, p.stdout + p.stderr
    assert tree(built.parent) == before


@pytest.mark.parametrize("force", [(), ("--force",)])
def test_a_folder_that_is_not_an_edgemix_build_is_never_replaced(tmp_path, force):
    user = tmp_path / "thesis"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("four years of work")
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (user / "report.json").write_text('{"title": "my own report"}')  # JSON, but not an edgemix report
    before = tree(tmp_path)
    p = run_cli(*X, "--out", user, *force)
    assert_clean_error(p, 2, str(user), "not an edgemix build", "choose another --out")
    assert "[reference]" not in p.stdout  # refused before any work
    assert tree(tmp_path) == before  # nothing deleted, and nothing (lock, staging) written beside it


def test_a_regular_file_is_never_replaced_nor_built_under(tmp_path):
    f = tmp_path / "notes"
    f.write_text("keep me")
    before = tree(tmp_path)
    assert_clean_error(run_cli(*X, "--out", f), 2, str(f), "is a file", "choose another --out")
    assert_clean_error(run_cli(*X, "--out", f, "--force"), 2, str(f), "is a file")
    assert_clean_error(run_cli(*X, "--out", f / "sub"), 2, str(f / "sub"), f"{f} is a file")
    assert tree(tmp_path) == before  # the file untouched, no hidden .notes.old-PID


def test_an_unwritable_location_is_one_clean_error(tmp_path, read_only, built):
    # A real read-only file system (a read-only bind mount, which binds root too, unlike chmod),
    # both for a new build folder on it and for a previous build that lives on it.
    ro = read_only(tmp_path / "ro")
    assert_clean_error(run_cli(*X, "--out", ro / "out"), 2, str(ro / "out"), "cannot write", "Read-only file system")
    assert not os.listdir(ro)
    prev = tmp_path / "prev"
    shutil.copytree(built, prev / "out")
    read_only(prev)
    before = tree(prev)
    assert_clean_error(run_cli(*Y, "--out", prev / "out"), 2, str(prev / "out"), "Read-only file system")
    assert tree(prev) == before
    # sysfs refuses new files even to root: a location that is not a folder one can write at all
    target = "/sys/edgemix-test-out"
    assert_clean_error(run_cli(*X, "--out", target), 2, target, "cannot write")
    assert not os.path.lexists(target) and not os.path.lexists("/sys/.edgemix-test-out.lock")


# ------------------------------------------------------------------------------------ CLI: item 4

def test_second_build_into_a_locked_folder_is_refused_at_once(previous):
    before = tree(previous.parent)
    lock = outdir.lock_path(previous)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
        os.write(fd, f"{os.getpid()}\n".encode())
        p = run_cli(*Y, "--out", previous, "--force")
        assert_clean_error(p, 2, f"another build (pid {os.getpid()}) is writing {previous}")
        assert "[reference]" not in p.stdout  # before the FP32 reference, not after a whole build
        after = tree(previous.parent)
    finally:
        os.close(fd)
        lock.unlink()
    assert after.pop(lock.name) == f"{os.getpid()}\n".encode()  # the refused build did not touch the lock
    assert after == before  # the existing build unchanged, no staging folder


# ------------------------------------------------------------------------------------ CLI: items 2, 3

def test_kill_after_the_exchange_leaves_the_new_build_and_the_next_build_cleans_up(previous, tmp_path):
    if not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    old = tree(previous)
    p = run_cli(*Y, "--out", previous, env={"EDGEMIX_FAULT_INJECT": "after-exchange"})
    assert p.returncode == KILLED, p.stdout + p.stderr
    assert report(previous)["drift"]["samples"] == 120  # the final name already holds the NEW build
    [left] = leftovers(previous)
    assert left.startswith(".out.staging-") and tree(previous.parent / left) == old  # the old one, aside
    new = tree(previous)
    p = run_cli(*Y, "--out", previous)  # same request: up to date, and the leftover is cleaned
    assert p.returncode == 0 and "up to date" in p.stdout, p.stdout + p.stderr
    assert tree(previous) == new and only_out(previous)


def test_kill_between_the_two_renames_restores_the_previous_build(previous):
    old = tree(previous)
    fallback = {"EDGEMIX_NO_RENAME_EXCHANGE": "1"}
    p = run_cli(*Y, "--out", previous, env={**fallback, "EDGEMIX_FAULT_INJECT": "between-renames"})
    assert p.returncode == KILLED, p.stdout + p.stderr
    assert not previous.exists()  # the gap the fallback cannot avoid
    left = leftovers(previous)
    assert [n.split("-")[0] for n in left] == [".out.old", ".out.staging"], left
    assert tree(previous.parent / left[0]) == old
    p = run_cli(*X, "--out", previous)  # the previous build's own request: restored, then up to date
    assert p.returncode == 0, p.stdout + p.stderr
    assert "restored" in p.stdout and "up to date" in p.stdout, p.stdout
    assert tree(previous) == old and only_out(previous)
    p = run_cli(*Y, "--out", previous, env=fallback)  # the fallback path, uninterrupted, does replace
    assert p.returncode == 0, p.stdout + p.stderr
    assert report(previous)["drift"]["samples"] == 120 and only_out(previous)


def test_a_killed_build_leaves_nothing_behind_for_long(previous):
    old = tree(previous)
    p = run_cli(*Y, "--out", previous, env={"EDGEMIX_FAULT_INJECT": "before-swap"})
    assert p.returncode == KILLED, p.stdout + p.stderr
    assert tree(previous) == old  # killed before the swap: the previous build untouched
    [left] = leftovers(previous)
    assert left.startswith(".out.staging-") and report(previous.parent / left)["drift"]["samples"] == 120
    # older leftovers (an old edgemix, a crash) and names that only look alike
    (previous.parent / ".out.old-999999" / "x").mkdir(parents=True)
    (previous.parent / ".out.staging-999998").write_text("")
    for name in (".out.staging-notes", "out.old-1", ".out2.staging-1"):
        (previous.parent / name).write_text("the user's")
    p = run_cli(*X, "--out", previous)
    assert p.returncode == 0 and "up to date" in p.stdout, p.stdout + p.stderr
    assert tree(previous) == old
    assert sorted(p.name for p in previous.parent.iterdir()) == [".out.staging-notes", ".out2.staging-1", "out",
                                                                 "out.old-1"]


# ------------------------------------------------------------------------------------ helpers

def _fake_build(folder, tag="x"):
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"schema_version": 1, "provenance": {"tag": tag}}))
    (folder / "model.onnx").write_text(tag)


@pytest.mark.parametrize("content, ours", [
    (None, False), ("", False), ("{not json", False), ("[1, 2]", False), ('{"schema_version": 1}', False),
    ('{"provenance": {}}', False), ('{"schema_version": 1, "provenance": {}}', True),
])
def test_is_edgemix_artifact(tmp_path, content, ours):
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    assert outdir.is_edgemix_artifact(tmp_path) is ours


def test_check_destination(tmp_path):
    _fake_build(tmp_path / "ours")
    (tmp_path / "empty").mkdir()
    for fine in ("ours", "empty", "missing", "missing/deeper"):
        outdir.check_destination(tmp_path / fine)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("")
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    for bad, needle in (("theirs", "not an edgemix build"), ("file", "is a file"), ("file/sub", "is a file"),
                        ("link", "symbolic link")):
        with pytest.raises(UsageError, match=needle) as e:
            outdir.check_destination(tmp_path / bad)
        assert str(tmp_path / bad) in str(e.value)


def test_recover_restores_the_newest_complete_old_build_and_removes_every_leftover(tmp_path):
    out = tmp_path / "out"
    _fake_build(tmp_path / ".out.old-11", "older")
    _fake_build(tmp_path / ".out.old-12", "newer")
    os.utime(tmp_path / ".out.old-11" / "report.json", (1, 1))
    (tmp_path / ".out.old-13").mkdir()  # incomplete: never restored
    (tmp_path / ".out.old-13" / "half.onnx").write_text("")
    _fake_build(tmp_path / ".out.staging-14", "never reported success")
    for name in (".out.staging-x", ".other.old-1", "out.old-2"):
        (tmp_path / name).write_text("the user's")
    outdir.recover(out)
    assert report(out)["provenance"]["tag"] == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.old-1", ".out.staging-x", "out", "out.old-2"]


def test_recover_keeps_an_existing_build(tmp_path):
    out = tmp_path / "out"
    _fake_build(out, "current")
    _fake_build(tmp_path / ".out.old-5", "previous")
    outdir.recover(out)
    assert report(out)["provenance"]["tag"] == "current" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_claim_is_exclusive_and_leaves_no_lock_file(tmp_path):
    out = tmp_path / "deep" / "out"
    with outdir.claim(out):
        assert outdir.lock_path(out).read_text() == f"{os.getpid()}\n"
        with pytest.raises(UsageError, match=rf"another build \(pid {os.getpid()}\) is writing {out}"), \
                outdir.claim(out):
            pass
    assert list(out.parent.iterdir()) == []
    with outdir.claim(out):  # free again
        pass


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_swaps_in_the_new_build_on_both_paths(tmp_path, monkeypatch, exchange):
    if exchange and not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    if not exchange:
        monkeypatch.setenv(outdir.NO_EXCHANGE_ENV, "1")
    out = tmp_path / "out"
    _fake_build(out, "old")
    _fake_build(outdir.staging_path(out), "new")
    outdir.replace(outdir.staging_path(out), out)
    assert report(out)["provenance"]["tag"] == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    _fake_build(outdir.staging_path(out), "into nothing")
    shutil.rmtree(out)
    outdir.replace(outdir.staging_path(out), out)
    assert report(out)["provenance"]["tag"] == "into nothing" and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("impl", ["_renameat2_symbol", "_renameat2_syscall"])
def test_rename_exchange_through_libc_symbol_and_raw_syscall(tmp_path, impl):
    fn = getattr(outdir, impl)()
    if fn is None:
        pytest.skip(f"no {impl[len('_renameat2_'):]} on this C library / architecture")
    if not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    _fake_build(tmp_path / "a", "a")
    _fake_build(tmp_path / "b", "b")
    outdir.rename_exchange(tmp_path / "a", tmp_path / "b", _impl=fn)
    assert report(tmp_path / "a")["provenance"]["tag"] == "b" and report(tmp_path / "b")["provenance"]["tag"] == "a"
    with pytest.raises(FileNotFoundError):  # errno comes through: the caller tells "unsupported" apart
        outdir.rename_exchange(tmp_path / "a", tmp_path / "missing", _impl=fn)

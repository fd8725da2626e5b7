import pytest

from edgemix.config import load_targets, resolve_recipe, resolve_target
from edgemix.errors import UsageError


def test_shipped_targets_validate_and_aliases():
    targets = load_targets()
    assert {"jetson-orin-nano", "jetson-agx-orin", "android-arm64", "host-cpu"} <= set(targets)
    assert resolve_target("jetson").name == "jetson-orin-nano"
    assert resolve_target("phone").backend == "executorch"
    assert resolve_target("jetson").tensorrt.version == "10.3"
    assert resolve_target("jetson").batch_range == (1, 1, 8)


def test_unknown_target_suggests():
    with pytest.raises(UsageError) as e:
        resolve_target("jetsn")
    assert "'jetsn'" in str(e.value) and "android-arm64" in str(e.value) and "did you mean 'jetson'" in str(e.value)


@pytest.mark.parametrize("body,needle", [
    ('backend = "tensorrt"\nprecisions=["int8"]\n[runner]\nkind="ssh"\n', "needs a [tensorrt] table"),
    ('backend = "coreml"\nprecisions=["int8"]\n[runner]\nkind="ssh"\n', "backend"),
    ('backend = "executorch"\nprecisions=["int8"]\nbatch_sizes=[0]\n[runner]\nkind="adb"\n', "batch_sizes"),
    ('backend = "tensorrt"\nprecisions=["int8"]\n[runner]\nkind="ssh"\n[tensorrt]\nversion="7.1"\n', "TensorRT 8"),
    ('backend = "tensorrt"\nprecisions=["int8"]\n[runner]\nkind="ssh"\n[tensorrt]\nversion="8.6"\nopset=19\n', "needs TensorRT 10"),
    ('backend = "executorch"\nprecisions=["int8"]\nbogus=1\n[runner]\nkind="adb"\n', "bogus"),
    ('backend = "executorch"\nprecisions = [int8\n', "not valid TOML"),
])
def test_malformed_target_files(tmp_path, body, needle):
    path = tmp_path / "mine.toml"
    path.write_text(body)
    with pytest.raises(UsageError) as e:
        resolve_target(str(path))
    assert needle in str(e.value) and "mine.toml" in str(e.value)


def test_recipes():
    r = resolve_recipe("default")
    assert (r.data, r.images, r.observer) == ("sample", 128, "minmax")
    with pytest.raises(UsageError, match="did you mean 'default'"):
        resolve_recipe("defualt")


def test_a_folder_of_own_profiles_and_recipes(tmp_path):
    """$EDGEMIX_TARGETS_PATH / $EDGEMIX_CALIB_PATH: the user's folders are searched first, through the
    real command, and a file with a shipped name replaces that profile."""
    from conftest import assert_clean_error, run_cli

    from edgemix.config import TARGETS_DIR

    mine = tmp_path / "targets"
    mine.mkdir()
    orin = (TARGETS_DIR / "jetson-orin-nano.toml").read_text()
    (mine / "my-orin.toml").write_text(orin.replace("max_top1_drop = 1.0", "max_top1_drop = 0.25"))
    (mine / "android-arm64.toml").write_text((TARGETS_DIR / "android-arm64.toml").read_text()
                                             .replace("threads = 2", "threads = 4"))
    recipes = tmp_path / "calib"
    recipes.mkdir()
    (recipes / "tiny.toml").write_text('data = "sample"\nimages = 16\n')
    env = {"EDGEMIX_TARGETS_PATH": str(mine), "EDGEMIX_CALIB_PATH": str(recipes)}
    p = run_cli("targets", "--json", env=env)
    assert p.returncode == 0, p.stderr
    targets = __import__("json").loads(p.stdout)
    assert targets["my-orin"]["budget"]["max_top1_drop"] == 0.25 and "jetson-orin-nano" in targets
    assert targets["android-arm64"]["threads"] == 4  # the user's file replaced the shipped one
    p = run_cli("build", "--target", "my-orin", "--calib", "tiny", "--eval-limit", "50", "--no-compare-fp32",
                "--latency-runs", "3", "--latency-seconds", "0", "--out", tmp_path / "out", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    report = __import__("json").loads((tmp_path / "out" / "report.json").read_text())
    assert report["target"] == "my-orin" and report["provenance"]["calibration_images"] == 16
    assert_clean_error(run_cli("targets", env={"EDGEMIX_TARGETS_PATH": str(tmp_path / "nope")}), 2,
                       "EDGEMIX_TARGETS_PATH names", "not a folder")

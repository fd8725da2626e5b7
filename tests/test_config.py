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

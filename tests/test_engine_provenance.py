"""Every TensorRT engine carries its provenance, and nothing loads one that is not its own: the device
script's check on recorded facts (a wrong GPU, a wrong TensorRT, a changed flag, a corrupt engine),
its TensorRT runtime with a fake trtexec, and the host's exit code for a refusal."""

import json
import os
import sys
import textwrap

import pytest

from edgemix.resources import device_script

dev = device_script()

ORIN = dict(tensorrt="10.3.0.30", gpu="NVIDIA Jetson Orin Nano Developer Kit iGPU", compute_cap=None, l4t="36.4.0",
            precision="int8", fp16=True, onnx_sha256="ab" * 32, batch_range=(1, 1, 8))


def _prov(**change):
    facts = {**ORIN, **change}
    return dev.engine_provenance(facts["tensorrt"], facts["gpu"], facts["compute_cap"], facts["l4t"],
                                 facts["precision"], facts["fp16"], facts["onnx_sha256"], facts["batch_range"])


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(b"serialized engine bytes")
    dev.write_provenance(str(path), _prov(), "trtexec")
    return str(path)


def test_an_engine_matching_its_record_is_accepted(engine):
    assert dev.engine_mismatches(engine, _prov()) == []
    record = json.loads(open(engine + ".json").read())
    assert record["format"] == dev.PROVENANCE_FORMAT and record["engine_sha256"] == dev.file_sha256(engine)


@pytest.mark.parametrize("change, needle", [
    ({"gpu": "NVIDIA A100-SXM4-80GB"}, "gpu: the engine was built for 'NVIDIA Jetson Orin Nano Developer Kit iGPU', "
                                       "this run has 'NVIDIA A100-SXM4-80GB'"),
    ({"tensorrt": "8.6.2.3"}, "tensorrt: the engine was built for '10.3.0.30', this run has '8.6.2.3'"),
    ({"fp16": False}, "fp16: the engine was built for True, this run has False"),  # --no-fp16
    ({"onnx_sha256": "cd" * 32}, "onnx_sha256"),
    ({"batch_range": (1, 4, 16)}, "batch_range"),
    ({"l4t": "35.4.1"}, "l4t: the engine was built for '36.4.0', this run has '35.4.1'"),
])
def test_a_different_device_or_request_is_named_on_both_sides(engine, change, needle):
    problems = dev.engine_mismatches(engine, _prov(**change))
    assert len(problems) == 1 and needle in problems[0], problems


def test_a_corrupt_or_replaced_engine_file_is_refused(engine):
    with open(engine, "ab") as f:
        f.write(b"garbage")
    problems = dev.engine_mismatches(engine, _prov())
    assert len(problems) == 1 and "changed after it was built" in problems[0]


def test_an_engine_without_a_readable_record_is_refused(engine):
    os.replace(engine + ".json", engine + ".json.bak")
    assert "has no provenance record" in dev.engine_mismatches(engine, _prov())[0]
    with open(engine + ".json", "w") as f:
        f.write("{not json")
    assert "cannot be read" in dev.engine_mismatches(engine, _prov())[0]
    with open(engine + ".json", "w") as f:
        json.dump({"tensorrt": "10.3.0.30", "gpu": "x"}, f)  # the old two-field record
    assert "is not edgemix-engine-provenance/1" in dev.engine_mismatches(engine, _prov())[0]


@pytest.fixture
def fake_trt(tmp_path, monkeypatch):
    """The device script's TensorRT runtime with a fake trtexec (it writes the engine it is asked for,
    counting builds) and stated device facts; returns a function making the runtime for argv."""
    trtexec = tmp_path / "trtexec"
    builds = tmp_path / "builds"
    trtexec.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do case "$a" in --saveEngine=*) echo "engine $*" > "${{a#*=}}"; echo x >> {builds};; esac; done
        """))
    trtexec.chmod(0o755)
    facts = {"gpu": "NVIDIA Jetson Orin Nano Developer Kit iGPU", "trt": "10.3.0.30"}
    monkeypatch.setattr(dev, "find_trtexec", lambda: str(trtexec))
    monkeypatch.setattr(dev, "tensorrt_version", lambda: facts["trt"])
    monkeypatch.setattr(dev, "gpu_name", lambda: facts["gpu"])
    monkeypatch.setattr(dev, "compute_capability", lambda: None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # no Python bindings: trtexec builds
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"an onnx model")
    cache = tmp_path / "cache"

    def make(*extra):
        args = dev.parse_args(["--model", str(onnx), "--input-name", "input", "--sample-shape", "1,28,28",
                               "--cache-dir", str(cache), *extra])
        return dev.TensorRTRuntime(str(onnx), args)

    make.facts, make.builds, make.cache = facts, builds, cache
    return make


def _builds(make):
    return len(make.builds.read_text().splitlines()) if make.builds.exists() else 0


def test_runtime_builds_once_then_reuses_its_own_engine(fake_trt):
    rt = fake_trt()
    assert rt.prepare["cached"] is False and _builds(fake_trt) == 1
    assert json.loads(open(rt.engine + ".json").read())["gpu"] == fake_trt.facts["gpu"]
    again = fake_trt()
    assert again.prepare["cached"] is True and again.engine == rt.engine and _builds(fake_trt) == 1


def test_no_fp16_is_a_different_engine_not_the_cached_one(fake_trt):
    with_fp16 = fake_trt()
    without = fake_trt("--no-fp16")
    assert without.engine != with_fp16.engine and without.prepare["cached"] is False and _builds(fake_trt) == 2


def test_garbage_under_the_cached_name_is_refused_then_rebuilt_when_asked(fake_trt):
    rt = fake_trt()
    with open(rt.engine, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(dev.Failure) as e:
        fake_trt()
    assert e.value.kind == "engine_mismatch" and "changed after it was built" in e.value.message
    assert "--rebuild-engine" in e.value.hint
    rebuilt = fake_trt("--rebuild-engine")
    assert rebuilt.prepare["cached"] is False and rebuilt.prepare["rebuilt_because"] and _builds(fake_trt) == 2
    assert dev.engine_mismatches(rebuilt.engine, json.loads(open(rebuilt.engine + ".json").read())) == []


def test_an_engine_from_another_gpu_is_refused(fake_trt, tmp_path):
    """An engine built elsewhere (the host, another board) handed over with --engine: refused."""
    rt = fake_trt()
    fake_trt.facts["gpu"] = "NVIDIA GeForce RTX 4090"
    with pytest.raises(dev.Failure) as e:
        fake_trt("--engine", rt.engine)
    assert "gpu: the engine was built for 'NVIDIA Jetson Orin Nano Developer Kit iGPU', this run has " \
           "'NVIDIA GeForce RTX 4090'" in e.value.message


def test_the_host_reports_a_refused_engine_as_a_usage_error():
    from edgemix.errors import UsageError
    from edgemix.runners.protocol import ERROR_MARK, parse_device_output

    err = {"kind": "engine_mismatch", "message": "the engine x does not match this run: gpu: ...",
           "hint": "rebuild it here with --rebuild-engine"}
    with pytest.raises(UsageError) as e:
        parse_device_output(ERROR_MARK + json.dumps(err) + "\n", "", 1, "me@orin", "python3")
    assert e.value.exit_code == 2 and "engine mismatch on me@orin" in str(e.value)

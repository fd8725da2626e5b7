"""tools/record_result.py: the committed JSON behind the README's figures, and its --check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "record_result.py"
RESULTS = ROOT / "docs" / "results"


def _report(top1_int8=0.932, size=882856, model="vip-fmnist"):
    return {"model": model, "target_alias": "phone", "precision": "int8",
            "evaluation": {"data": "fashion-mnist:test", "samples": 10000},
            "reference": {"top1": 0.9333}, "deployed": {"top1": top1_int8}, "drift": {"agreement": 0.9948},
            "artifact": {"bytes": size}, "latency_ms": {"p50": 0.9, "threads": 2},
            "fp32_comparison": {"fp32_bytes": 2991528, "fp32_p50_ms": 1.2, "latency_ratio": 0.75,
                                "int8_faster": True},
            "provenance": {"date": "2026-11-30T16:00:00+00:00", "git_commit": "abc",
                           "machine": {"cpu": "Some CPU", "cpus": 2, "isa": ["avx2"]}}}


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def recorded(tmp_path):
    rep = tmp_path / "report.json"
    rep.write_text(json.dumps(_report()))
    p = _run(rep, "--command", "edgemix build --target phone --model vip-fmnist", "--results-dir", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    return tmp_path / "r" / "vip-fmnist_phone_int8.json"


def test_record_holds_command_host_and_figures(recorded):
    r = json.loads(recorded.read_text())
    assert r["command"] == "edgemix build --target phone --model vip-fmnist"
    assert r["host"] == {"cpu": "Some CPU", "cpus": 2, "isa": ["avx2"], "threads": 2} and r["date"] == "2026-11-30"
    assert (r["top1_fp32"], r["top1_deployed"], r["agreement"]) == (0.9333, 0.932, 0.9948)
    assert r["artifact_bytes"] == 882856 and r["int8_faster"] is True


@pytest.mark.parametrize("change, agrees", [
    ({}, True),
    ({"top1_int8": 0.9335}, True),      # 0.15 point: within the default 0.3
    ({"top1_int8": 0.925}, False),      # 0.7 point
    ({"size": 900000}, True),           # 1.9%
    ({"size": 950000}, False),          # 7.6%
    ({"model": "cyclemlp-fmnist"}, False),
])
def test_check_compares_a_fresh_report(recorded, tmp_path, change, agrees):
    rep = tmp_path / "fresh.json"
    rep.write_text(json.dumps(_report(**change)))
    p = _run(rep, "--check", recorded)
    assert p.returncode == (0 if agrees else 1), p.stdout + p.stderr
    assert ("agrees with the record" in p.stdout) == agrees


def test_bad_input_is_exit_2(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    assert _run(tmp_path / "x.json", "--command", "c").returncode == 2
    (tmp_path / "y.json").write_text("{}")
    p = _run(tmp_path / "y.json", "--command", "c")
    assert p.returncode == 2 and "not an edgemix build report" in p.stderr
    rep = tmp_path / "r.json"
    rep.write_text(json.dumps(_report()))
    assert _run(rep).returncode == 2  # recording needs the command that regenerates it


def test_committed_records_are_well_formed():
    """Every committed record names the command that regenerates it, the date and the host."""
    records = sorted(RESULTS.glob("*.json"))
    assert records
    for path in records:
        r = json.loads(path.read_text())
        assert r["command"].startswith("edgemix ") and r["date"] and r["host"]["cpu"], path
        # a random 1000-class head scores 0 on Fashion-MNIST; its agreement with FP32 is what counts
        assert r["name"] == path.stem and 0 <= r["top1_deployed"] <= 1 and 0 < r["agreement"] <= 1, path


def test_stage_table_shows_each_stage_time_and_peak():
    sys.path.insert(0, str(ROOT / "tools"))
    from results_table import stage_rows

    phone = {"command": "edgemix build --target phone --model h14 --random-weights", "build_seconds": 612.4,
             "peak_rss_mb": 15360.0, "stages_s": {"reference": 100.0, "lower": 300.5, "isa": 60.0},
             "stages_peak_rss_mb": {"reference": 2048.0, "lower": 15360.0, "isa": None}}
    jetson = {"command": "edgemix build --target jetson --model h14 --random-weights", "build_seconds": 400.0,
              "peak_rss_mb": None, "stages_s": {"reference": 0.1, "trt-check": 2.0}}  # a record without memory
    head, rule, row_p, row_j = stage_rows([phone, jetson])
    assert head.split(" | ")[3:] == ["reference s (GB)", "lower s (GB)", "isa s (GB)", "trt-check s (GB) |"]
    assert row_p.endswith("| 612 | 15.0 | 100.0 (2.0) | 300.5 (15.0) | 60.0 | – |")
    assert row_j.endswith("| 400 |  | 0.1 | – | – | 2.0 |")

"""bench/suite.py: the committed suite JSON is what docs/performance.md's tables print."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "suite" / "suite.json"


def _suite():
    spec = importlib.util.spec_from_file_location("edgemix_bench_suite", ROOT / "bench" / "suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_performance_tables_are_the_committed_suite_json():
    """Every row of docs/performance.md's suite tables comes from the committed run: edit the JSON
    or the page by hand and this fails; rerun the suite and paste its --markdown to mend it."""
    results = json.loads(RESULT.read_text())
    prov = results["provenance"]
    assert prov["command"].startswith("bench/suite.py") and prov["date"] and prov["git_commit"]
    assert results["machine"]["cpu"] and "isa" in results["machine"]  # the host beside every figure
    md = _suite().markdown(results)
    page = (ROOT / "docs" / "performance.md").read_text()
    assert md in page
    # the tables hold every timed path and every whole build of the run
    assert md.count("| s16 | 1 |") == 5 and md.count("| l16 | 1 |") == 5
    assert sum(line.startswith("| s16 | phone |") for line in md.splitlines()) == 2


def test_markdown_renders_a_run_without_scale_or_builds():
    results = {"threads": 2, "runs": 3, "warmup": 1, "machine": {"cpu": "Some CPU", "cpus": 2, "isa": []},
               "cases": [{"model": "fmnist", "batch": 1, "path": "torch eager fp32", "p50_ms": 2.0, "p90_ms": 2.5,
                          "per_image_ms": 2.0, "ratio_vs_torch_eager": 1.0, "ratio_vs_ort_fp32": None,
                          "bytes": 2**21, "build_s": 0.0},
                         {"model": "fmnist", "batch": 1, "path": "executorch int8", "p50_ms": 0.5, "p90_ms": 0.6,
                          "per_image_ms": 0.5, "ratio_vs_torch_eager": 0.25, "ratio_vs_ort_fp32": None,
                          "bytes": 2**19, "build_s": 12.5, "build_peak_rss_mb": 490.0, "inference_rss_mb": 0.0}]}
    md = _suite().markdown(results).splitlines()
    assert "Some CPU, 2 cores (none), 2 threads" in md[0]
    assert md[-1] == "| fmnist | 1 | executorch int8 | 0.50 | 0.60 | 0.50 | 0.25× |  | 0.5 | 12.5 | 490 | 0 |"
    assert md[-2].startswith("| fmnist | 1 | torch eager fp32 | 2.00 |") and "| 2.0 |  |" in md[-2]


def test_growth_rows_follow_the_models_size():
    rows = _suite().growth([json.loads(RESULT.read_text())]).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| fmnist", "| s16", "| b16", "| l16"]  # ordered by GMACs
    et = next(c for c in json.loads(RESULT.read_text())["cases"]
              if (c["model"], c["batch"], c["path"]) == ("s16", 1, "executorch int8"))
    assert f"| {et['p50_ms']:.1f} ({et['ratio_vs_torch_eager']:.2f}×) |" in rows[1]


def test_readme_growth_and_h14_tables_are_the_committed_runs():
    suite, h14 = RESULT, RESULT.with_name("h14.json")
    mod = _suite()
    growth = mod.growth([json.loads(suite.read_text()), json.loads(h14.read_text())])
    assert growth in (ROOT / "README.md").read_text()
    assert [r.split(" | ")[0] for r in growth.splitlines()[2:]] == ["| fmnist", "| s16", "| b16", "| l16", "| h14"]
    assert mod.markdown(json.loads(h14.read_text())) in (ROOT / "docs" / "performance.md").read_text()

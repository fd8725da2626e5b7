"""The README's Python example runs as written."""

import os
import re
import subprocess
import sys

from conftest import REPO


def test_readme_python_example_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has a Python example"
    p = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, CI="true"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "XNNPACK partition(s)" in p.stdout and "gate" in p.stdout
    assert (tmp_path / "artifacts" / "my_net_phone" / "report.json").is_file()
    assert (tmp_path / "artifacts" / "fmnist_jetson_int8" / "report.json").is_file()

"""benchmarks/coverage.py: its usage errors."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "coverage.py")


def test_repeat_below_one_is_a_usage_error(tmp_path):
    out = tmp_path / "cov.md"
    p = subprocess.run([sys.executable, SCRIPT, "--repeat", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].endswith("--repeat 0: give 1 or more runs per tool")
    assert not out.exists() and not (tmp_path / "cov.md.jsonl").exists()

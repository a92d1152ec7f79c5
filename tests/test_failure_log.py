"""tests/conftest.py's failure log: with $PET_FAST_FAILURE_LOG set, each failure's text is appended to the
file as it happens (benchmarks/gpu_check.sh sets it: a GPU run cut at its limit never prints pytest's summary)."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
def test_passes():
    assert True

def test_fails():
    value = 3
    assert value == 4, ("value", value)
'''


def test_failures_are_written_as_they_happen(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    log = tmp_path / "failures.log"
    env = dict(os.environ, PET_FAST_FAILURE_LOG=str(log), PYTHONPATH=str(TESTS))
    env.pop("PYTEST_XDIST_WORKER", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    text = log.read_text()
    assert text.count("=== ") == 1  # the failure only, once
    assert "test_sample.py::test_fails (call)" in text and "('value', 3)" in text

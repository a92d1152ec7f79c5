"""benchmarks/gpu_check.sh, the one script a GPU session runs, driven on the CPU with stand-ins for
python, nvidia-smi and pkill: what it runs, in which order and with which environment. Here: the gate
that turns the launch replay off for everything after its GPU tests when they fail."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPLAY_FILES = ["tests/test_triton_replay.py", "tests/test_adapter_replayed_call.py", "tests/test_stacked_fusion_replay.py",
                "tests/test_fusion_replayed_call.py"]

# Stands for python: logs "<PET_FAST_TRITON_REPLAY>|<arguments>" and succeeds, except the pytest run of the
# replay's tests, which exits with $FAKE_REPLAY_RC.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "${PET_FAST_TRITON_REPLAY:-unset}|$*" >> "$FAKE_LOG"
case "$*" in
  *"-m pytest"*test_triton_replay.py*) exit "${FAKE_REPLAY_RC:-0}" ;;
  *"-m pytest"*)  # the main GPU suite; with $FAKE_MAIN_FAIL, one failure written where tests/conftest.py would
    if [ -n "${FAKE_MAIN_FAIL:-}" ]; then
      printf '=== tests/test_x.py::test_gpu_y (call)\nE   AssertionError: err 1e-3\n\n' >> "$PET_FAST_FAILURE_LOG"
      exit 1
    fi ;;
esac
exit 0
"""


def _run(tmp_path, replay_rc, marker=False, warm=None, main_fail=False, benches="host_overhead"):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and timeout")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python", FAKE_PYTHON), ("nvidia-smi", "#!/bin/sh\nexit 0\n"), ("pkill", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    cache = tmp_path / "cache"
    if marker:
        cache.mkdir()
        (cache / "replay_failed").touch()
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PET_FAST_TRITON_REPLAY", "STEP_FIRST")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), FAKE_REPLAY_RC=str(replay_rc),
               PET_FAST_CACHE=str(cache), TESTS_LIMIT_S="60", DEADLINE_S="400", BENCHES=benches,
               TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_WARM_CACHE=str(warm or tmp_path / "absent.tar.gz"),
               FAKE_MAIN_FAIL="1" if main_fail else "")
    work = tmp_path / "work"
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "kernels", str(work)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    calls = [line.split("|", 1) for line in log.read_text().splitlines()]
    pytest_calls = [(replay, args) for replay, args in calls if "-m pytest" in args]
    later = [(replay, args) for replay, args in calls if "bench_host_overhead.py" in args]  # after the tests
    unpacked = [args for _, args in calls if "triton_cache_pack.py unpack" in args]
    _run.calls = [args for _, args in calls]
    return out, pytest_calls, later, (work / "summary.txt").read_text(), cache / "replay_failed", unpacked


def test_failing_replay_tests_turn_the_replay_off_for_the_rest_of_the_run(tmp_path):
    out, pytest_calls, later, summary, marker, unpacked = _run(tmp_path, replay_rc=1)
    assert out.returncode == 1  # a failed step fails the script
    assert len(pytest_calls) == 2
    (replay_env, replay_args), (main_env, main_args) = pytest_calls
    assert replay_env == "unset" and all(f in replay_args for f in REPLAY_FILES)
    # the main run: replay off, every other test file, not the replay's again
    assert main_env == "0"
    assert "tests/test_masked_weights.py" in main_args and "tests/test_properties.py" in main_args
    assert not any(f in main_args for f in REPLAY_FILES)
    assert [env for env, _ in later] == ["0"]  # the benchmark after the tests
    assert "replay: OFF" in summary and marker.exists()


def test_passing_replay_tests_leave_it_on(tmp_path):
    out, pytest_calls, later, summary, marker, unpacked = _run(tmp_path, replay_rc=0)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [env for env, _ in pytest_calls] == ["unset", "unset"]
    assert not any(f in pytest_calls[1][1] for f in REPLAY_FILES)
    assert [env for env, _ in later] == ["unset"]
    assert "replay: OFF" not in summary and not marker.exists()


def test_failures_of_the_main_suite_reach_the_summary(tmp_path):
    out, pytest_calls, later, summary, marker, unpacked = _run(tmp_path, replay_rc=0, main_fail=True)
    assert out.returncode == 1
    assert "failures.log: 1 failure(s)" in summary
    assert "tests/test_x.py::test_gpu_y (call)" in summary and "E   AssertionError: err 1e-3" in summary
    assert (tmp_path / "work" / "failures.log").exists()


def test_a_failure_found_by_an_earlier_run_on_the_machine_keeps_it_off(tmp_path):
    out, pytest_calls, later, summary, marker, unpacked = _run(tmp_path, replay_rc=0, marker=True)
    assert len(pytest_calls) == 1 and pytest_calls[0][0] == "0"  # no replay gate: straight to the main run
    assert not any(f in pytest_calls[0][1] for f in REPLAY_FILES)
    assert [env for env, _ in later] == ["0"]
    assert "PET_FAST_TRITON_REPLAY=0" in summary


def test_a_carried_triton_cache_is_unpacked_before_anything_compiles(tmp_path):
    warm = tmp_path / "warm.tar.gz"
    warm.write_bytes(b"")
    *_, unpacked = _run(tmp_path, replay_rc=0, warm=warm)
    assert unpacked == [f"benchmarks/triton_cache_pack.py unpack {warm} {tmp_path / 'triton'}"]
    (tmp_path / "none").mkdir()
    *_, unpacked = _run(tmp_path / "none", replay_rc=0)  # no archive: nothing unpacked
    assert unpacked == []


def test_profile_adapter_runs_each_shape_and_site_and_none_runs_nothing(tmp_path):
    out, *_ = _run(tmp_path, replay_rc=0, benches="none profile_adapter")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    profiles = [a for a in _run.calls if "profile_adapter.py" in a]
    assert len(profiles) == 3
    assert "--shape 4096,768,64 --site houlsby" in profiles[0] and "--site pfeiffer" in profiles[1]
    assert "--site plain" in profiles[2]
    assert "unknown benchmark" not in (tmp_path / "work" / "summary.txt").read_text()


def test_a_run_stopped_by_a_signal_still_brings_back_what_it_has(tmp_path):
    """The device tool returns what lies under $OUT: the script packs its results there after every step and,
    on SIGTERM (a time limit), at once, not after the step it is waiting for."""
    import signal
    import time

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and timeout")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = "#!/usr/bin/env bash\ncase \"$*\" in *bench_host_overhead*) sleep 60 ;; esac\nexit 0\n"
    for name, body in (("python", slow), ("nvidia-smi", "#!/bin/sh\nexit 0\n"), ("pkill", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PET_FAST_TRITON_REPLAY", "STEP_FIRST")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OUT=str(out_dir), PET_FAST_CACHE=str(tmp_path / "cache"),
               TESTS_LIMIT_S="0", DEADLINE_S="400", BENCHES="host_overhead", TRITON_CACHE_DIR=str(tmp_path / "t"),
               TRITON_WARM_CACHE=str(tmp_path / "absent.tar.gz"))
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh", "kernels", str(tmp_path / "work")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while "info: rc=0" not in ((out_dir / "summary.txt").read_text() if (out_dir / "summary.txt").exists() else ""):
        assert time.time() < deadline, "no summary under $OUT after the info step"
        time.sleep(0.2)
    assert (out_dir / "gpu_check.tar.gz").exists()  # packed after the step
    time.sleep(1)  # inside the slow benchmark now
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143 and time.time() - t0 < 20
    assert "stopped by a signal" in (out_dir / "summary.txt").read_text()

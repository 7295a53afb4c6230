"""Synchronized batch norm across real processes (jax.distributed, gloo, 127.0.0.1 only), and its failures.

Each test launches worker processes of `examples/multi_process.py`; the launcher gives every run a timeout and
kills every worker it started, whatever happens.
"""

import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
import multi_process

SCRIPT = pathlib.Path(multi_process.__file__)


def test_two_processes_match_one_process_and_train_identically(tmp_path):
    report = multi_process.main(["--epochs", "1", "--max-steps", "4", "--timeout", "120", "--out", str(tmp_path)])
    assert report.pop("identical_across_processes")
    for name, difference in report.items():
        assert np.isfinite(difference) and difference < 1e-5, name
    assert report["padding_dx"] == 0.0


def test_four_processes_pool_their_uneven_masked_rows(tmp_path):
    report = multi_process.main(["--processes", "4", "--epochs", "0", "--timeout", "120", "--out", str(tmp_path)])
    assert all(np.isfinite(d) and d < 1e-5 for d in report.values()), report


def test_a_dead_worker_stops_the_run_with_a_clear_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(multi_process.WorkerError, match="worker 1 exited with status 3"):
        multi_process.main(["--epochs", "0", "--crash-process", "1", "--timeout", "120", "--out", str(tmp_path)])
    assert time.monotonic() - start < 90


def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    command = [sys.executable, str(SCRIPT), "--process-id", "1", "--processes", "2", "--init-timeout", "3"]
    command += ["--coordinator", f"127.0.0.1:{multi_process.free_port()}", "--out", str(tmp_path)]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "could not reach the coordinator at 127.0.0.1:" in result.stderr
    assert time.monotonic() - start < 60

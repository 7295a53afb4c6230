"""The benchmark scripts run (tiny shapes); their timings are never asserted."""

import numpy as np

from benchmarks import forward, precision


def test_forward_benchmark_runs_quick(capsys):
    ratios = forward.main(["--quick"])
    assert len(ratios) == 4 and all(np.isfinite(r) and r > 0 for r in ratios.values())
    assert "jbn/flax" in capsys.readouterr().out


def test_precision_benchmark_shows_jbn_exact_where_flax_default_is_not():
    errors = precision.main(["--quick"])
    for name, (jbn_error, flax_default, _) in errors.items():
        assert jbn_error < 1e-4, name
        if name != "rms_norm":  # RMS norm does not center, so it has nothing to cancel
            assert flax_default > 10, name

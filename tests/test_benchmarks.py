"""The benchmark scripts run (tiny shapes); their timings are never asserted."""

import jax
import numpy as np
import pytest

from benchmarks import peers, precision, speed, variants


@pytest.fixture(scope="module")
def quick_results():
    return speed.main(["--quick", "--rows", "jbn", "flax.linen"])


def test_speed_benchmark_runs_quick_and_prints_ratios(quick_results, capsys):
    rows = {(r["workload"], r["mode"], r["row"]) for r in quick_results}
    assert len(rows) == len(quick_results)
    for workload in peers.workloads(quick=True):
        assert (workload.name, "train", "jbn") in rows
    for r in quick_results:
        assert r["ms"] > 0 and np.isfinite(r["jbn_over_row"]) and r["roofline"] > 0
        if r["mode"] == "train" and r["row"] == "jbn":
            assert 1.0 <= r["saved_x"] < 2.0  # x itself, plus per-group statistics (large at these tiny sizes)


@pytest.mark.parametrize("workload", peers.workloads(quick=True), ids=lambda w: w.name)
def test_jbn_training_outputs_in_the_benchmark_equal_flax_autodiff(workload):
    x = jax.random.normal(jax.random.key(1), workload.shape) * 2.0 + 0.5
    ct = jax.random.normal(jax.random.key(2), workload.shape)
    ours, theirs = peers.build_jbn(workload), peers.build_linen(workload)
    assert theirs is not None, f"flax.linen has every quick workload, {workload.name} included"
    y, _, dx, dparams = ours.train(x, ours.params, ours.state, ct)
    native = theirs.to_native  # Flax's layout, where it has only one (group norm: channels last)
    flax_y, _, flax_dx, flax_dparams = theirs.train(native(x), theirs.params, theirs.state, native(ct))
    np.testing.assert_allclose(native(y), flax_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(native(dx), flax_dx, rtol=1e-4, atol=1e-4)
    for name, value in flax_dparams["params"].items():
        np.testing.assert_allclose(dparams[name].reshape(value.shape), value, rtol=1e-4, atol=1e-4)


def test_precision_benchmark_shows_jbn_exact_where_flax_default_is_not():
    errors = precision.main(["--quick"])
    for name, (jbn_error, flax_default, _) in errors.items():
        assert jbn_error < 1e-4, name
        if name != "rms_norm":  # RMS norm does not center, so it has nothing to cancel
            assert flax_default > 10, name


def test_variants_benchmark_times_every_variant_against_jbn_as_shipped():
    results = variants.main(["--quick", "--only", "layer"])
    assert {r["row"] for r in results} == {*variants.VARIANTS, "flax.linen"}
    for r in results:
        assert r["ms"] > 0 and np.isfinite(r["over_shipped"])
        if r["row"] == "shipped":
            assert r["over_shipped"] == 1.0

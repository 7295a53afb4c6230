"""Every example runs end to end on a tiny budget and shows what it claims; the training loop resumes exactly."""

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
import compare_norms
import digits_mlp
import functional_api
import inference
import multi_device
import quickstart
import train_loop


def test_quickstart_trains_and_shows_the_precision_gap(capsys):
    result = quickstart.main(["--steps", "40", "--batch-size", "128"])
    assert np.mean(result["losses"][-5:]) < 0.2 * result["losses"][0]
    assert result["jbn_error"] < 1e-3
    assert result["flax_error"] > 100
    assert "running var / true var" in capsys.readouterr().out


def test_digits_mlp_runs_six_trainings_and_plots(tmp_path, capsys):
    out = tmp_path / "curves.png"
    results = digits_mlp.main(["--epochs", "2", "--max-steps", "3", "--out", str(out), "--no-progress"])
    assert len(results) == 6 and all(len(history) == 2 for history in results.values())
    assert out.stat().st_size > 10_000
    assert "| Keras defaults | yes |" in capsys.readouterr().out


def test_compare_norms_runs_every_norm_and_batch_size(tmp_path):
    out = tmp_path / "norms.png"
    args = ["--epochs", "1", "--max-steps", "2", "--batch-sizes", "2", "8", "--batch-size-epochs", "1"]
    result = compare_norms.main([*args, "--out", str(out), "--no-progress"])
    assert set(result["curves"]) == {"batch", "layer", "instance", "group", "rms", "none"}
    assert len(result["by_batch"]) == 8
    assert out.exists()


def test_functional_api_checks_its_own_claims():
    result = functional_api.main(["--epochs", "1", "--max-steps", "3", "--ensemble", "3"])
    assert len(result["members"]) == 3
    assert result["gradient_difference"] < 1e-4
    assert result["scan_difference"] < 1e-5


def test_multi_device_pools_exactly_and_trains_like_one_device():
    result = multi_device.main(["--epochs", "1", "--max-steps", "3"])
    assert result["statistics_difference"] < 1e-5
    assert result["output_difference"] < 1e-4
    assert result["param_difference"] < 1e-4
    assert result["replicas_agree"]


def test_inference_compares_running_and_population_statistics():
    result = inference.main(["--epochs", "1", "--max-steps", "5"])
    assert set(result["accuracies"]) == {"running", "precise"}
    assert result["precise"].mean.shape == (functional_api.HIDDEN,)
    assert result["agreement"] < 1e-5  # pooled over batches = one pass over the whole training set


@pytest.fixture(scope="module")
def tiny_training():
    train, test = train_loop.digits(0)
    params, state = functional_api.init_params(jax.random.key(0))
    optimizer = optax.adam(1e-2)
    steps = train_loop.make_steps(lambda p, s, x, t: functional_api.forward(p, s, x, t), optimizer)
    return train, test, train_loop.init_state(params, state, optimizer), steps


def test_resume_from_a_checkpoint_continues_bit_for_bit(tmp_path, tiny_training):
    train, test, initial, steps = tiny_training
    options = dict(batch_size=32, seed=3, max_steps=4, progress=False)
    straight, straight_history = train_loop.fit(initial, steps, train, test, epochs=4, **options)
    train_loop.fit(initial, steps, train, test, epochs=2, checkpoint_dir=tmp_path, **options)
    resumed, resumed_history = train_loop.fit(initial, steps, train, test, epochs=4, checkpoint_dir=tmp_path, **options)
    assert [h["epoch"] for h in resumed_history] == [3, 4]
    assert resumed_history == straight_history[2:]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)

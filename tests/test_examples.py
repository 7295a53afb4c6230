"""The examples run end to end on a few steps and show what they claim."""

import numpy as np

from examples import quickstart


def test_quickstart_trains_and_shows_the_precision_gap(capsys):
    result = quickstart.main(["--steps", "40", "--batch-size", "128"])
    assert np.mean(result["losses"][-5:]) < 0.2 * result["losses"][0]
    assert result["jbn_error"] < 1e-3
    assert result["flax_error"] > 100
    assert "running var / true var" in capsys.readouterr().out

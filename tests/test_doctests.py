"""Every docstring example in jbn runs and prints what it claims."""

import doctest

import pytest

from jbn import _batch_norm, _norms, _stats, linen, nnx


@pytest.mark.parametrize("module", [_stats, _batch_norm, _norms, linen, nnx], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0

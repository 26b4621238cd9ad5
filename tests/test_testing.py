"""attnkit.testing's accuracy rule fails where it should (every kernel test leans on it)."""

import numpy as np
import pytest

from attnkit.testing import assert_within_rule


def test_rule_passes_within_the_budget_and_names_the_worst_element_beyond_it():
    expected = np.array([[1.0, 2.0], [3.0, -np.inf]])
    plain = expected + np.array([[1e-3, 0.0], [0.0, 0.0]])
    assert_within_rule("out", expected + 1.9e-3, expected, plain, 2)  # 1.9e-3 <= 2 x 1e-3 + 1e-6
    beyond = expected.copy()
    beyond[1, 0] += 2.1e-3
    with pytest.raises(AssertionError, match=r"out: max error 0.0021 at \(1, 0\).*allowed 0.002"):
        assert_within_rule("out", beyond, expected, plain, 2)


def test_rule_refuses_nan_and_unequal_infinities():
    expected = np.array([0.5, -np.inf])
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_rule("lse", np.array([np.nan, -np.inf]), expected, expected, 2)
    with pytest.raises(AssertionError, match=r"lse: at \(1,\) got 0.0, expected -inf"):
        assert_within_rule("lse", np.array([0.5, 0.0]), expected, expected, 2)
    with pytest.raises(AssertionError, match="shape"):
        assert_within_rule("lse", np.zeros(3), expected, expected, 2)

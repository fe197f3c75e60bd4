"""The one noise model: standard error of a chain mean, the signed-log scale, residual noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slt_callbacks.analysis.noise import (
    residual_noise,
    signed_log,
    signed_log_inverse,
    signed_log_stderr,
    standard_error,
)


def test_standard_error_divides_by_root_chains_and_keeps_the_std_when_unknown():
    assert standard_error(0.8, 4) == pytest.approx(0.4)
    assert standard_error(0.8, None) == 0.8  # unknown chains: the conservative bound
    assert math.isnan(standard_error(0.0, 4)) and math.isnan(standard_error(math.nan, 4))
    array = standard_error(np.array([0.9, 0.0, -1.0, 1.8]), 9)
    np.testing.assert_allclose(array, [0.3, np.nan, np.nan, 0.6])


@pytest.mark.parametrize("chains", [0, -2, 2.0, True, "4"])
def test_standard_error_rejects_bad_chain_counts(chains):
    with pytest.raises(ValueError, match="`num_chains`"):
        standard_error(1.0, chains)


def test_signed_log_is_odd_monotone_and_inverted_exactly():
    x = np.array([-1e4, -5800.0, -30.0, -0.5, 0.0, 0.5, 12.0, 1e4])
    z = signed_log(x, 1.0)
    assert np.all(np.diff(z) > 0) and z[4] == 0.0
    np.testing.assert_allclose(signed_log(-x, 1.0), -z)
    np.testing.assert_allclose(signed_log_inverse(z, 1.0), x, rtol=1e-12)
    # Far above the scale a relative noise becomes a constant noise: 10% -> ~0.1.
    assert signed_log_stderr(5800.0, 580.0, 1.0) == pytest.approx(0.1, rel=1e-3)
    # The delta-method error matches the finite difference of the transform.
    h = 1e-6
    slope = (signed_log(12.0 + h, 3.0) - signed_log(12.0 - h, 3.0)) / (2 * h)
    assert signed_log_stderr(12.0, 1.0, 3.0) == pytest.approx(slope, rel=1e-6)


def test_residual_noise_ignores_trends_and_measures_white_noise():
    x = np.log10(np.unique(np.geomspace(1, 1e5, 200).round()) + 1)
    line = 3.0 + 2.0 * x
    noise, dof = residual_noise(x, line)
    assert noise == pytest.approx(0.0, abs=1e-9) and dof > 40
    # 0.2 white noise on the line: within 15% (about 150 residuals; the trimmed RMS of
    # 0.45 x 150 effective degrees of freedom has a relative error of ~8%).
    rng = np.random.default_rng(0)
    noisy, _ = residual_noise(x, line + 0.2 * rng.standard_normal(x.size))
    assert noisy == pytest.approx(0.2, rel=0.15)
    assert residual_noise(x[:4], line[:4]) == (math.nan, 0.0)

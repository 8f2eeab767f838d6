"""Calibration metrics against hand-computed examples and brute-force references."""

import numpy as np
import pytest

from perspective_jax.evaluate.calibration import (auroc, ece, fit_temperature, reliability,
                                                  risk_coverage)


def test_ece_by_hand_with_empty_bins_and_the_closed_last_bin():
    # 3 bins: [0, 1/3), [1/3, 2/3), [2/3, 1]; the middle one is empty.
    conf = [0.1, 0.2, 0.9, 1.0]
    correct = [False, True, True, False]
    # bin 0: mean conf 0.15, acc 0.5 → |0.35| · 2/4;  bin 2: mean 0.95, acc 0.5 → 0.45 · 2/4
    assert ece(conf, correct, bins=3) == pytest.approx(0.5 * 0.35 + 0.5 * 0.45)
    rows = reliability(conf, correct, bins=3)
    assert [r[1] for r in rows] == [2, 0, 2] and np.isnan(rows[1][2])
    assert ece([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)   # calibrated


def test_auroc_matches_brute_force_pairs_with_ties():
    rng = np.random.default_rng(0)
    conf = np.round(rng.uniform(size=200), 1)                  # many ties
    correct = rng.uniform(size=200) < conf
    pos, neg = conf[correct], conf[~correct]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(conf, correct) == pytest.approx(brute)
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert np.isnan(auroc([0.5, 0.6], [True, True]))


def test_risk_coverage_keeps_the_most_confident_first():
    cov, risk, area = risk_coverage([0.9, 0.2, 0.6, 0.4], [True, False, False, True])
    # order 0.9 (ok), 0.6 (wrong), 0.4 (ok), 0.2 (wrong)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    assert area == pytest.approx(np.mean([0.0, 0.5, 1 / 3, 0.5]))


def test_fit_temperature_recovers_the_generating_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 12)) * 3.0
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(-1, keepdims=True)
    targets = np.array([rng.choice(12, p=row) for row in p])
    assert fit_temperature(logits, targets) == pytest.approx(true_t, rel=0.08)


@pytest.mark.parametrize("conf,correct,match", [
    ([], [], "no predictions"), ([0.5], [True, False], "1 confidences for 2"),
    ([1.5], [True], "lie in"), ([float("nan")], [True], "finite")])
def test_bad_inputs_are_clear_errors(conf, correct, match):
    with pytest.raises(ValueError, match=match):
        ece(conf, correct)


def test_fit_logistic_matches_a_gradient_descent_reference_and_recovers_the_model():
    """Newton's fit = plain gradient descent on the same objective (float64); on data
    drawn from σ(2a − b + 0.5) it recovers the weights."""
    from perspective_jax.evaluate.calibration import fit_logistic, predict_logistic
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2))
    y = rng.random(20000) < 1 / (1 + np.exp(-(2 * x[:, 0] - x[:, 1] + 0.5)))
    w = fit_logistic(x, y, l2=0.0)
    np.testing.assert_allclose(w, [2.0, -1.0, 0.5], atol=0.1)
    xb = np.c_[x[:2000], np.ones(2000)]
    v = np.zeros(3)
    for _ in range(20000):                       # reference: gradient descent
        p = 1 / (1 + np.exp(-xb @ v))
        v -= 0.5 * xb.T @ (p - y[:2000]) / 2000
    np.testing.assert_allclose(fit_logistic(x[:2000], y[:2000], l2=0.0), v, atol=1e-3)
    p = predict_logistic(w, x)
    assert p.shape == (20000,) and np.all((p > 0) & (p < 1))

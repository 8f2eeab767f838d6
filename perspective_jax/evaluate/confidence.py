"""Confidence methods compared on teacher-forced predictions (issue 20, SPEC §3.6).

Fitted on a validation split, reported on a separate test split (`Scored`):

    softmax          max softmax probability of P0; correct = P0's argmax is the target
    temperature      the same after softmax(logits / T), T fitted on validation NLL
    mpd_agreement_forked      SPEC's MPD confidence (1 − agree/τ, vote share · mean
                              voted probability, 0 when uncertain), views forked from
                              P0's state; correct = the token MPD emits (the vote,
                              or P0's argmax) is the target
    mpd_agreement_persistent  the same with persistent per-perspective states
    mpd_ensemble_forked       the views' mean probability of MPD's token (forked)
    mpd_ensemble_persistent   the same, persistent states
    mpd_triggered    as decoding runs it: MPD's forked confidence (MPDConfig.confidence)
                     where the trigger fires within the budget (`should_trigger`,
                     `within_budget`), the softmax's elsewhere
    logistic         σ(w·[log max-prob, log ensemble prob, agreement] + b) fitted on
                     validation: a calibrator of MPD's (forked) token over softmax
                     and the views' features

`table(val, test, cfg)` → {method: Row(ece, auroc, aurc, accuracy, mean confidence)}
plus the per-method (confidence, correct) arrays for the pictures.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.evaluate.calibration import (auroc, ece, fit_logistic, fit_temperature,
                                                  predict_logistic, risk_coverage)
from perspective_jax.evaluate.teacher_forced import Scored
from perspective_jax.model.mpd import should_trigger, within_budget

METHODS = ("softmax", "temperature", "mpd_agreement_forked", "mpd_agreement_persistent",
           "mpd_ensemble_forked", "mpd_ensemble_persistent", "mpd_triggered", "logistic")


class Row(NamedTuple):
    ece: float
    auroc: float
    aurc: float            # area under the risk-coverage curve (lower is better)
    accuracy: float
    mean_confidence: float


def _softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _features(s: Scored) -> np.ndarray:
    """[log max-prob of P0, log of the views' mean prob of MPD's token, agreement]."""
    d = s.mpd["forked"]
    top = _softmax(s.logits).max(axis=-1)
    return np.stack([np.log(np.maximum(top, 1e-12)), np.log(np.maximum(d.mean_prob, 1e-12)),
                     d.agreement], axis=1)


def methods(val: Scored, test: Scored, cfg: MPDConfig = MPDConfig()) -> dict:
    """{method: (confidence [N], correct [N])} on `test`, with what was fitted on
    `val` under "fitted" ({"temperature": T, "logistic": weights})."""
    probs = _softmax(test.logits)
    argmax_right = probs.argmax(axis=-1) == test.targets
    out = {"softmax": (probs.max(axis=-1), argmax_right)}
    temperature = fit_temperature(val.logits, val.targets)
    out["temperature"] = (_softmax(test.logits, temperature).max(axis=-1), argmax_right)
    for state in ("forked", "persistent"):
        if state in test.mpd:
            d = test.mpd[state]
            right = d.token == test.targets
            out[f"mpd_agreement_{state}"] = (d.confidence.astype(np.float64), right)
            out[f"mpd_ensemble_{state}"] = (d.mean_prob.astype(np.float64), right)
    fitted = {"temperature": temperature}
    if "forked" in test.mpd:
        d = test.mpd["forked"]
        mpd_conf = d.mean_prob if cfg.confidence == "ensemble" else d.confidence
        fires = budgeted(np.asarray(should_trigger(jnp.asarray(test.position),
                                                   jnp.asarray(probs, jnp.float32), cfg)),
                         test.position, test.segment, cfg.max_rate)
        out["mpd_triggered"] = (np.where(fires, mpd_conf, probs.max(axis=-1)),
                                np.where(fires, d.token, probs.argmax(-1)) == test.targets)
        fitted["trigger_rate"] = float(fires.mean())
        weights = fit_logistic(_features(val), val.mpd["forked"].token == val.targets)
        out["logistic"] = (predict_logistic(weights, _features(test)), d.token == test.targets)
        fitted["logistic"] = weights.tolist()
    out["fitted"] = fitted
    return out


def budgeted(fires: np.ndarray, position: np.ndarray, segment: np.ndarray,
             max_rate: float) -> np.ndarray:
    """The triggers decoding would honour: per segment, in position order, a trigger
    counts only while within `model.mpd.within_budget`."""
    out = np.zeros_like(fires)
    for seg in np.unique(segment):
        idx = np.flatnonzero(segment == seg)
        idx = idx[np.argsort(position[idx], kind="stable")]
        spent = 0
        for i in idx:
            if fires[i] and within_budget(spent, position[i], max_rate):
                out[i] = True
                spent += 1
    return out


def table(confidences: dict) -> dict:
    """{method: Row} for every method of `methods`' output."""
    rows = {}
    for name in METHODS:
        if name not in confidences:
            continue
        conf, right = confidences[name]
        conf = np.clip(conf, 0.0, 1.0)
        rows[name] = Row(ece(conf, right), auroc(conf, right), risk_coverage(conf, right)[2],
                         float(np.mean(right)), float(np.mean(conf)))
    return rows


def nll_per_token(s: Scored) -> float:
    """Mean negative log-likelihood (nats) of the targets under P0."""
    logp = jax.nn.log_softmax(jnp.asarray(s.logits, jnp.float32), axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(s.targets)[:, None], -1)))

"""Calibration of a confidence against correctness (SPEC §3.6, §5), in float64 numpy.

conf [N] in [0, 1], correct [N] bool (e.g. "the argmax was the next token"):

* `ece`            expected calibration error over `bins` equal-width bins of
                   confidence: Σ_b (n_b / N) · |acc_b − conf_b| (empty bins add 0;
                   the last bin is closed at 1);
* `reliability`    the per-bin (lower edge, count, mean confidence, accuracy) behind it;
* `auroc`          P(conf of a correct prediction > conf of a wrong one), ties ½
                   (the Mann–Whitney statistic; nan when one class is empty);
* `risk_coverage`  for every threshold, (coverage, error rate among kept), keeping
                   the most confident first; and its area (lower is better);
* `fit_temperature` the T minimising the NLL of softmax(logits / T) on a split;
* `fit_logistic`   a logistic calibrator P(correct | features) = σ(w·f + b) fitted
                   by Newton's method (IRLS, tiny L2), `predict_logistic` applies it.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def _arrays(conf, correct):
    conf = np.asarray(conf, np.float64).reshape(-1)
    correct = np.asarray(correct, bool).reshape(-1)
    if conf.shape != correct.shape:
        raise ValueError(f"{conf.size} confidences for {correct.size} outcomes")
    if conf.size == 0:
        raise ValueError("no predictions to calibrate")
    if np.any((conf < 0) | (conf > 1)) or not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be finite and lie in [0, 1]")
    return conf, correct


def reliability(conf, correct, bins: int = ECE_BINS) -> list[tuple[float, int, float, float]]:
    """(bin lower edge, count, mean confidence, accuracy) per equal-width bin;
    mean confidence and accuracy are nan in an empty bin."""
    conf, correct = _arrays(conf, correct)
    index = np.minimum((conf * bins).astype(int), bins - 1)     # conf = 1 → last bin
    rows = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        rows.append((b / bins, n, float(conf[sel].mean()) if n else float("nan"),
                     float(correct[sel].mean()) if n else float("nan")))
    return rows


def ece(conf, correct, bins: int = ECE_BINS) -> float:
    """Expected calibration error with `bins` equal-width bins (empty bins add 0)."""
    conf, _ = _arrays(conf, correct)
    return float(sum(n / conf.size * abs(acc - mean)
                     for _, n, mean, acc in reliability(conf, correct, bins) if n))


def auroc(conf, correct) -> float:
    """Area under the ROC curve of `conf` separating correct from wrong (ties ½)."""
    conf, correct = _arrays(conf, correct)
    pos, neg = int(correct.sum()), int((~correct).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(conf, kind="mergesort")
    ranks = np.empty(conf.size)
    sorted_conf = conf[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_conf)) + 1]
    ends = np.r_[starts[1:], conf.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2
    return float((ranks[correct].sum() - pos * (pos + 1) / 2) / (pos * neg))


def risk_coverage(conf, correct) -> tuple[np.ndarray, np.ndarray, float]:
    """(coverage [N], risk [N], area): keeping the k most confident predictions
    (k = 1..N), coverage k/N and error rate among them; area = mean risk."""
    conf, correct = _arrays(conf, correct)
    order = np.argsort(-conf, kind="mergesort")
    errors = np.cumsum(~correct[order])
    k = np.arange(1, conf.size + 1)
    risk = errors / k
    return k / conf.size, risk, float(risk.mean())


def _nll(logits, targets, temperature):
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[:, None], axis=-1).mean())


def fit_temperature(logits, targets, lo: float = 0.05, hi: float = 20.0,
                    iters: int = 60) -> float:
    """The temperature T > 0 minimising the mean NLL of softmax(logits / T) for
    logits [N, V] and integer targets [N] (golden-section search on log T; the NLL
    is convex in 1/T)."""
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets).reshape(-1).astype(int)
    if logits.ndim != 2 or logits.shape[0] != targets.size or targets.size == 0:
        raise ValueError(f"need logits [N, V] and N targets, got {logits.shape} and "
                         f"{targets.size}")
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll(logits, targets, np.exp(c)), _nll(logits, targets, np.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll(logits, targets, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll(logits, targets, np.exp(d))
    return float(np.exp((a + b) / 2))


def fit_logistic(features, correct, l2: float = 1e-4, iters: int = 50) -> np.ndarray:
    """Weights [F + 1] (bias last) of σ(f·w + b) maximising the L2-regularised
    log-likelihood of `correct` [N] from features [N, F] (Newton / IRLS)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(correct, bool).reshape(-1).astype(np.float64)
    if x.ndim != 2 or x.shape[0] != y.size or y.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"need finite features [N, F] and N outcomes, got {x.shape}, {y.size}")
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    w = np.zeros(x.shape[1])
    reg = l2 * np.eye(x.shape[1])
    reg[-1, -1] = 0.0                                  # the bias is not shrunk
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / y.size + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x / y.size + reg
        step = np.linalg.solve(hess + 1e-12 * np.eye(x.shape[1]), grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def predict_logistic(weights, features) -> np.ndarray:
    """σ(f·w + b) [N] for features [N, F] and `fit_logistic`'s weights."""
    x = np.asarray(features, np.float64)
    return 1.0 / (1.0 + np.exp(-(x @ weights[:-1] + weights[-1])))

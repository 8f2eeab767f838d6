"""Evaluation: calibration metrics of confidences (and, with issue 20, the
`perspective-eval` metric registry and gates)."""

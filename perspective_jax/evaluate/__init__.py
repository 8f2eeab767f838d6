"""Evaluation of a streamed model (`perspective-eval`): teacher-forced scoring with
MPD's views, calibration metrics and confidence methods, the metric registry, gates
and the report."""

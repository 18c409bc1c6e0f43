"""Metrics for training and evaluation loops (the ``metrics`` extra: torchmetrics).

:class:`ConservativityMetric` (:mod:`.conservativity`) streams the audit's loop-integral and curl headline
metrics through ``update`` / ``compute`` / ``reset``, synchronised across ranks the way torchmetrics
synchronises any metric.
"""

from conservcheck.metrics.conservativity import RANK_STRIDE, ConservativityMetric

__all__ = ["RANK_STRIDE", "ConservativityMetric"]

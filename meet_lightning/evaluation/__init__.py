"""Evaluation: what a model does under each control, with intervals.

``metrics`` is the public face (what each metric means, every name importable from it); the metrics themselves
are ``loading`` (the model to score, a DPO export's reference), ``pair_scores`` (pairwise metrics), ``fidelity``
(generations under each control, measured per attribute), ``judges`` (reward models, the win rate) and
``summary`` (a metric's mean, interval and count). ``run`` is the ``evaluate`` command's options and report, over
those; ``plots`` and ``figures`` draw them (matplotlib, optional). Core: never Lightning.
"""

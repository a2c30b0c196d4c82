"""Evaluation: what a model does under each control, with intervals.

``metrics`` computes pairwise metrics, control fidelity and rewards; ``run`` is the ``evaluate`` command's options
and report, over those; ``plots`` and ``figures`` draw them (matplotlib, optional). Core: never Lightning.
"""

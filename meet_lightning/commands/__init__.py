"""Commands: the only modules that parse argv.

``cli`` is ``python -m meet_lightning`` (``fit``/``validate``/``test``/``predict`` over a recipe, and the command
table); ``inference`` holds the commands around an export (``generate``, ``evaluate``, ``push``); ``demo`` and
``inspect_data`` are their commands. Everything they run is importable without them.
"""

"""Training: the Lightning layer around the core.

``pipeline`` is the two-stage orchestrator (stage 1 fit → controls → stage 2 fit → export); ``checks`` refuses a bad
recipe, output folder or changed data before anything is written; ``checkpoints`` keeps and picks a stage's
checkpoint (``select``) and reads one back; ``loggers`` builds the experiment trackers; ``callbacks`` account
throughput and memory and generate samples per control; ``reliability`` makes a killed run resume bit-identically
and a bad step stop cleanly; ``distributed`` holds the FSDP wrap policy and says which rank writes. The
LightningModules are in :mod:`meet_lightning.modules`, the data module in :mod:`meet_lightning.data.datamodule`.
"""

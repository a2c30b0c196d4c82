"""Inference: a trained model used and shipped.

``generation`` generates under chosen controls; ``export`` writes and loads the export folder
(:class:`AlignedModel`); ``peft_export`` writes LoRA controls as PEFT adapters; ``model_card`` and ``publish`` put
it on the Hub; ``chat``, ``serve`` (OpenAI-compatible) and ``playground`` are the ways to talk to it. Core: never
Lightning.
"""

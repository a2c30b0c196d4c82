"""Controls: what steers the model, one learned set per preference label.

``tokens`` holds the interface (:class:`ControlTokens`) and its implementations (prompt tuning, LoRA, text, special
token), chosen from YAML by ``class_path``; ``files`` reads and writes ``controls.safetensors``; ``vocab`` turns
prompt-tuning controls into vocabulary that plain ``transformers`` steers; ``steering`` is the control vector, the
training-free baseline. Core: torch and transformers only.
"""

"""Offline evaluation of an exported (or plain Hugging Face) model: pairwise metrics, control fidelity, rewards.

Every metric is named by its scorer and never mixed with another:

* ``control_accuracy`` (and ``control_margin``): MEET's control classifier
  ``log p(y|x, good) − log p(y|x, bad)``; only for models whose controls change the input (prompt tuning,
  LoRA, text and special-token controls).
* ``dpo_reward_accuracy`` (and ``dpo_reward_margin``): the implicit DPO reward
  ``β · (log π(y|x) − log π_ref(y|x))``; only for DPO exports, against the reference their schema names.
* ``chosen_nll`` and ``logp_accuracy``: every model, in its *preferred mode* — its ``good`` control
  (``--good_control`` picks another), the Chain-of-Hindsight good phrase, or plain for models without
  controls. Per-token, so lengths do not decide: ``chosen_nll`` is the mean over chosen responses of each
  response's mean token NLL (:func:`~meet_lightning.losses.response_nll`), as ``val/chosen_nll`` is.

Each comes with its pair count and a 95 % interval: Wilson for accuracies and the win rate, bootstrap for
means, ``None`` below 20 pairs (too few for any interval to mean something). Generation-based metrics: the
control-fidelity matrix (rows: controls, columns: attribute functions such as word count or a reward model) with
a KL estimate to the base model per control, ``reward_model_score`` of generations under a Hugging Face
sequence-classification reward model, and ``win_rate`` against reference responses under a pluggable judge.

The modules, each one job: ``summary`` (a metric's mean, interval and count), ``loading`` (:class:`EvalModel`
from an export or a plain model, a DPO export's reference), ``pair_scores`` (the pairwise metrics above and
:func:`evaluate_model`), ``fidelity`` (generations under each control, measured by attribute functions, and their
KL to the base model) and ``judges`` (reward models and the win rate). Every name is importable from here, as
before the module was split.
"""

from __future__ import annotations

from meet_lightning.evaluation.fidelity import (
    DEFAULT_ATTRIBUTES,
    Attribute,
    control_fidelity,
    control_ids_for,
    generate_under,
    kl_to_base,
    word_count,
)
from meet_lightning.evaluation.judges import Judge, RewardModel, RewardModelJudge, import_callable, load_judge, win_rate
from meet_lightning.evaluation.loading import NO_CONTROL, EvalModel, load_for_evaluation, load_reference, schema_model_name
from meet_lightning.evaluation.pair_scores import (
    CHUNKS,
    RowPair,
    evaluate_model,
    evaluate_pairs,
    model_preference,
    no_pairs,
    pair_controls,
    preferred_mode,
    read_pairs,
    response_control_margins,
    score_pairs,
    score_tokenized,
    tokenized_pairs,
    under_model_controls,
)
from meet_lightning.evaluation.summary import is_proportion, summarize

__all__ = [
    "CHUNKS",
    "DEFAULT_ATTRIBUTES",
    "NO_CONTROL",
    "Attribute",
    "EvalModel",
    "Judge",
    "RewardModel",
    "RewardModelJudge",
    "RowPair",
    "control_fidelity",
    "control_ids_for",
    "evaluate_model",
    "evaluate_pairs",
    "generate_under",
    "import_callable",
    "is_proportion",
    "kl_to_base",
    "load_for_evaluation",
    "load_judge",
    "load_reference",
    "model_preference",
    "no_pairs",
    "pair_controls",
    "preferred_mode",
    "read_pairs",
    "response_control_margins",
    "schema_model_name",
    "score_pairs",
    "score_tokenized",
    "summarize",
    "tokenized_pairs",
    "under_model_controls",
    "win_rate",
    "word_count",
]

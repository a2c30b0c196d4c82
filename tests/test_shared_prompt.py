"""A pair_batch batch's rows share one pass over their prompt: the same log-probabilities and gradients as the full pass
(fp32), fewer tokens computed, and the full pass wherever sharing would change a value."""

from __future__ import annotations

import pytest
import torch
from conftest import control_variants, controlled_logps_and_grads

from meet_lightning.controls.shared_prompt import prompt_families, shared_prompt_split
from meet_lightning.controls.tokens import controlled_response_logps
from meet_lightning.data.rows import ControlSchema
from meet_lightning.models import load_model, load_tokenizer
from meet_lightning.modules import JointFinetuneModule
from meet_lightning.modules.base import enable_gradient_checkpointing

CONTROLS = control_variants()
SHARED = {"infix", "text", "none"}


def run(name, schema, batch, share, chunks=1, groups=1):
    """Log-probs, mask, every gradient of their sum, and the tokens the decoder computed (rows × length)."""
    if groups > 1:  # as scoring does: every pair's rows once more under the swapped controls
        n = int(batch["num_pairs"])
        swapped = torch.cat([batch["control_ids"][n:], batch["control_ids"][:n]])
        batch = {k: torch.cat([v, v]) if v.dim() else v for k, v in batch.items()}
        batch["control_ids"] = torch.cat([batch["control_ids"][: 2 * n], swapped])
    logps, mask, grads, shapes = controlled_logps_and_grads(name, schema, batch, chunks=chunks, share_prompt=share)
    return logps, mask, grads, sum(b * t for b, t in shapes)


@pytest.mark.parametrize("name", sorted(CONTROLS))
@pytest.mark.parametrize(("chunks", "groups"), [(1, 1), (3, 1), (1, 2), (2, 2)])
def test_shared_prompt_pass_equals_the_full_pass(pair_batch, name, chunks, groups):
    schema, batch = pair_batch
    logps, mask, grads, tokens = run(name, schema, batch, share=False, chunks=chunks, groups=groups)
    shared_logps, shared_mask, shared_grads, shared_tokens = run(name, schema, batch, True, chunks, groups)
    assert torch.equal(shared_mask, mask) and mask.any()
    torch.testing.assert_close(shared_logps, logps, rtol=0, atol=2e-5)
    assert grads.keys() == shared_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(shared_grads[key], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=key)
    # Each prompt (with a prefix control: each control and prompt) computed once: fewer tokens, even with every
    # continuation padded. A prefix control's pairs of rows in 2 chunks would compute more than the rows cut by
    # length, so the full pass runs there.
    if name in SHARED or (name == "prefix" and (chunks, groups) == (1, 2)):
        assert shared_tokens < tokens
    else:  # controls that change the prompt's computation keep the full pass
        assert shared_tokens == tokens


def test_rows_whose_prompts_differ_do_not_share(pair_batch):
    _, batch = pair_batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert shared_prompt_split(batch, ids, mask) is not None
    n, other = int(batch["num_pairs"]), ids.clone()
    other[n, 1] += 1  # the rejected row of pair 0 read another prompt (cut differently, say)
    assert shared_prompt_split(batch, other, mask) is None
    assert shared_prompt_split({k: v for k, v in batch.items() if k != "num_pairs"}, ids, mask) is None  # pointwise


def test_rows_with_one_prefix_control_and_prompt_form_a_family(pair_batch):
    """With a control before the prompt, the rows that read the same control and prompt share its pass, and only
    those: a row whose prompt differs by one token, or that has no response to split at, shares nothing."""
    schema, batch = pair_batch
    lm = load_model("tiny-debug", torch.float32)
    control = CONTROLS["prefix"]()
    control.setup(lm, load_tokenizer("tiny-debug"), schema)
    n = int(batch["num_pairs"])
    same_control = {**batch, "control_ids": torch.cat([batch["control_ids"][:n]] * 2)}  # both responses under "good"
    ids, mask, labels = control.insert(same_control)
    sharing = prompt_families(ids, mask, labels)
    assert sharing is not None and torch.equal(sharing.family, torch.arange(n).repeat(2))
    assert torch.equal(sharing.heads, torch.arange(n)) and (sharing.split < (labels != -100).int().argmax(-1)[:n]).all()
    other = ids.clone()
    other[n, 1] += 1
    assert prompt_families(other, mask, labels).family[n] == n  # its own prompt now
    assert prompt_families(*control.insert(batch)) is None  # chosen|good, rejected|bad: nothing shared
    unlabelled = labels.clone()
    unlabelled[0] = -100
    assert prompt_families(ids, mask, unlabelled) is None


def test_no_sharing_while_training_under_gradient_checkpointing(pair_batch):
    """Checkpointed layers drop the key/value cache in training, so the prompt's pass could not be reused."""
    schema, batch = pair_batch
    lm = load_model("tiny-debug", torch.float32)
    control = CONTROLS["infix"]()
    control.setup(lm, load_tokenizer("tiny-debug"), schema)
    enable_gradient_checkpointing(lm, control)
    lm.train()
    calls = []
    hook = lm.get_decoder().register_forward_pre_hook(lambda *a, **k: calls.append(1), with_kwargs=True)
    logps, mask = controlled_response_logps(lm, control, batch, share_prompt=True)
    hook.remove()
    assert len(calls) == 1 and mask.any()


@pytest.mark.parametrize("share", [False, True])
def test_share_prompt_is_a_module_option_off_by_default(pair_batch, share):
    """``model.init_args.share_prompt`` turns the shared pass on for a module: the same loss, fewer tokens."""
    schema, batch = pair_batch
    options = {"share_prompt": True} if share else {}
    torch.manual_seed(0)
    module = JointFinetuneModule("tiny-debug", CONTROLS["infix"](), schema.to_dict(), forward_chunks=1, **options)
    module.configure_model()
    module.train()
    shapes = []
    hook = module.lm.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    module.compute_loss(batch)
    hook.remove()
    rows = batch["input_ids"].shape[0]
    assert shapes == ([rows // 2, rows] if share else [rows])  # the prompts once, then every row's continuation


@pytest.mark.parametrize("name", ["infix", "text", "none", "prefix", "lora"])
def test_scoring_shares_the_prompt_pass_with_the_same_scores(name, shared_data):
    """``score_pairs``: a pair's four rows (both responses under both controls) continue from one prompt pass where
    the control allows (two with a prefix control: both responses under one control share it), computing fewer
    tokens; every score equals the unshared path's (fp32)."""
    from meet_lightning.data.formats import SourceConfig
    from meet_lightning.evaluation.metrics import EvalModel, read_pairs, score_pairs

    pairs = read_pairs(SourceConfig(path=str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), preference="harmless"), 16)
    tokenizer, schema = load_tokenizer("tiny-debug"), ControlSchema.from_dict({"harmless": ["good", "bad"]})
    torch.manual_seed(0)
    lm = load_model("tiny-debug", torch.float32).eval()
    control = CONTROLS[name]()
    control.setup(lm, tokenizer, schema)
    model = EvalModel("tiny", lm, tokenizer, control, schema if name != "none" else ControlSchema({}))
    computed = []
    hook = lm.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: computed.append(kwargs["inputs_embeds"].shape[:2].numel()), with_kwargs=True
    )
    scores = {}
    for share in (False, True):
        computed.clear()
        scores[share] = (score_pairs(model, pairs, max_length=256, batch_size=4, share_prompt=share)[0], sum(computed))
    hook.remove()
    (unshared, full_tokens), (shared, shared_tokens) = scores[False], scores[True]
    assert shared.keys() == unshared.keys() and len(shared["chosen_nll"]) >= 6
    for key, values in unshared.items():
        torch.testing.assert_close(torch.tensor(shared[key]), torch.tensor(values), rtol=0, atol=1e-4, msg=key)
    assert (shared_tokens < full_tokens) == (name in SHARED | {"prefix"}), (shared_tokens, full_tokens)

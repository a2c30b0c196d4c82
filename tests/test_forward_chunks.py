"""Forward passes in length chunks (``forward_chunks``): less padding computed, the same loss and gradients."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import build_tiny_hh_data

from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl, length_chunks
from meet_lightning.modules import DPOModule, JointFinetuneModule

CONTROLS = {
    "prefix": lambda: PromptTuningControl(num_tokens=3, init="random", placement="prefix"),
    "infix": lambda: PromptTuningControl(num_tokens=3, init="random", placement="infix"),
    "lora": lambda: LoRAControl(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def computed(lengths, groups):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def largest_pass(lengths, groups):
    return max(len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force(lengths, k):
    """(fewest computed tokens, then smallest largest pass) over every split of the sorted rows into min(k, rows)
    contiguous groups none of which computes more than ⌈rows / k⌉ × the longest row."""
    order, k = sorted(range(len(lengths)), key=lambda i: lengths[i]), min(k, len(lengths))
    cap, best = -(-len(lengths) // k) * max(lengths), None
    for cuts in itertools.combinations(range(1, len(order)), k - 1):
        groups = [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))]
        if largest_pass(lengths, groups) <= cap:
            value = (computed(lengths, groups), largest_pass(lengths, groups))
            best = value if best is None else min(best, value)
    return best


def test_length_chunks_is_the_cheapest_split_and_covers_every_row_once():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
        k = rng.randint(1, 4)
        groups = length_chunks(lengths, k)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert len(groups) == min(k, len(lengths)) and all(groups)  # as many passes on every rank (FSDP)
        assert (computed(lengths, groups), largest_pass(lengths, groups)) == brute_force(lengths, k)
    assert length_chunks([5, 3, 9], 1) == [[1, 0, 2]]
    assert length_chunks([7] * 4, 2) == [[0, 1], [2, 3]]  # equal rows split evenly (the fewest tokens either way)
    # the fewest tokens alone would be the three shorter rows in one pass (3 × 187 + 259 = 820 tokens against
    # 2 × 178 + 2 × 259 = 874), a pass of 561 tokens: more than two rows of the longest (518), which a memory probe
    # of rows at that length measured
    assert length_chunks([259, 187, 178, 170], 2) == [[3, 2], [1, 0]]


@pytest.fixture(scope="module")
def paired(shared_data):
    data = build_tiny_hh_data(shared_data, max_length=128, pair_batches=True, max_val_examples=2)
    return data.control_schema, next(iter(data.train_dataloader()))


def step(module, batch):
    """Loss, every gradient, and the tokens the decoder computed (rows × padded length, summed over passes)."""
    module.configure_model()
    with torch.no_grad():
        for name, p in module.control.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.1)
    module.train()
    shapes = []
    hook = module.lm.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True
    )
    loss = module.compute_loss(batch)["loss"]
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(b * t for b, t in shapes)


def build(kind, control_name, schema, chunks):
    torch.manual_seed(0)
    if kind == "dpo":
        return DPOModule("tiny-debug", None, schema, precompute_reference=False, forward_chunks=chunks)
    return JointFinetuneModule("tiny-debug", CONTROLS[control_name](), schema, forward_chunks=chunks)


@pytest.mark.parametrize(("kind", "control_name"), [("stage2", "prefix"), ("stage2", "infix"), ("stage2", "lora"), ("dpo", None)])
def test_chunked_forward_keeps_loss_and_gradients_and_computes_less_padding(kind, control_name, paired):
    schema, batch = paired
    loss, grads, tokens = step(build(kind, control_name, schema, 1), batch)
    chunked_loss, chunked_grads, chunked_tokens = step(build(kind, control_name, schema, 4), batch)
    real = int(batch["attention_mask"].sum())
    assert real <= chunked_tokens < tokens  # the batch had padding, and chunking computed less of it
    torch.testing.assert_close(chunked_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == chunked_grads.keys() and grads
    for name, grad in grads.items():
        # fp32 sums in another order (other shapes): equal to ~1e-6 of the largest entry
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_forward_chunks_below_one_is_refused_naming_the_flag():
    from meet_lightning.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"forward_chunks 0 must be ≥ 1 \(or null: chosen by device\) — set model.init_args.forward_chunks"
    ):
        JointFinetuneModule("tiny-debug", None, {"harmless": ["good", "bad"]}, forward_chunks=0)


def test_unset_forward_chunks_follow_the_device(monkeypatch):
    """Unset: 4 passes on a CPU, 1 on an accelerator (few-row passes wait on kernel launches); a set value wins."""
    schema = {"harmless": ["good", "bad"]}
    unset, two = (
        JointFinetuneModule("tiny-debug", None, schema),
        JointFinetuneModule("tiny-debug", None, schema, forward_chunks=2),
    )
    unset.configure_model(), two.configure_model()
    assert (unset.forward_passes(), two.forward_passes()) == (4, 2)
    monkeypatch.setattr(JointFinetuneModule, "device", property(lambda self: torch.device("cuda")))
    assert (unset.forward_passes(), two.forward_passes()) == (1, 2)

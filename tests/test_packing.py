"""Padding-free batches: rows packed end to end give the padded pass's log-probabilities and gradients (fp32) with
fewer rows computed; controls that route weights per row, and models whose attention ignores the restarts, keep
the padded pass or are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import control_variants, controlled_logps_and_grads

from meet_lightning.controls.packing import check_packing, pack_bins, packed_layout
from meet_lightning.errors import ConfigError
from meet_lightning.models import load_model
from meet_lightning.modules import JointFinetuneModule

CONTROLS = control_variants()


def test_bins_hold_every_row_once_within_the_longest():
    lengths = [9, 2, 7, 3, 5, 1, 9]
    bins = pack_bins(lengths)
    assert sorted(r for b in bins for r in b) == list(range(7)) and len(bins) == 4
    assert all(sum(lengths[r] for r in b) <= 9 for b in bins)
    row, col, positions = packed_layout(lengths, torch.device("cpu"))
    assert row.shape == (4, 9) and int((row >= 0).sum()) == sum(lengths)
    for b in range(4):  # each row's own positions, then the tail restarting at 0
        for r in bins[b]:
            assert torch.equal(col[b][row[b] == r], torch.arange(lengths[r]))
        assert torch.equal(positions[b][row[b] >= 0], col[b][row[b] >= 0])


def run(name, schema, batch, pack):
    """Log-probs, mask, every gradient of their sum, and the rows the decoder computed."""
    logps, mask, grads, shapes = controlled_logps_and_grads(name, schema, batch, pack=pack)
    return logps, mask, grads, sum(rows for rows, _ in shapes)


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_packed_rows_equal_the_padded_pass(pair_batch, name):
    schema, batch = pair_batch
    logps, mask, grads, rows = run(name, schema, batch, pack=False)
    packed_logps, packed_mask, packed_grads, packed_rows = run(name, schema, batch, pack=True)
    assert torch.equal(packed_mask, mask) and mask.any()
    torch.testing.assert_close(packed_logps, logps, rtol=0, atol=2e-5)
    assert grads.keys() == packed_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(packed_grads[key], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=key)
    if name == "lora":  # every row through its own control's adapter: the padded pass
        assert packed_rows == rows
    else:
        assert packed_rows < rows


def test_pack_rows_is_a_module_option_with_the_same_loss(pair_batch):
    schema, batch = pair_batch
    losses, rows = {}, {}
    for pack in (False, True):
        torch.manual_seed(0)
        module = JointFinetuneModule("tiny-debug", CONTROLS["prefix"](), schema.to_dict(), forward_chunks=1, pack_rows=pack)
        module.configure_model()
        seen: list[int] = []
        hook = module.lm.get_decoder().register_forward_pre_hook(
            lambda _, args, kwargs, seen=seen: seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
        )
        losses[pack] = module.compute_loss(batch)["loss"].item()
        hook.remove()
        rows[pack] = sum(seen)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5) and rows[True] < rows[False]


def test_a_model_whose_attention_ignores_the_restarts_is_refused(monkeypatch):
    lm = load_model("tiny-debug", torch.float32)
    check_packing(lm, "tiny-debug")  # transformers' llama keeps packed rows apart
    decoder = lm.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))
    with pytest.raises(ConfigError, match="pack_rows: false"):
        check_packing(lm, "tiny-debug")

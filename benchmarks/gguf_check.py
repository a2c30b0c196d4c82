"""A trained export in llama.cpp: converted to GGUF, steered by the ``controls:`` directive, answers measured.

    python benchmarks/gguf_check.py --export runs/length_study/runs/meet_prompt-lr1/export \
        --prompts runs/length_study/data/alpaca/heldout.jsonl --out benchmarks/results/gguf

Needs ``make gguf``. Converts the export with llama.cpp's own converter (``--outtype``, f16 by default, as a user
would serve it), then answers held-out prompts in llama-cpp-python through ``create_chat_completion`` — the GGUF's
own chat template renders the ``controls:`` system message, as any llama.cpp server would — under each control,
sampled like the length task. Reports the verbose/concise word ratio (median and geometric mean over prompts),
the share of answers that reached ``--max-tokens``, and every control token llama.cpp generated (there must be
none: llama.cpp reads no ``suppress_tokens``). Writes ``gguf_check.json`` and ``gguf_check.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"
DECODING = {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.1}
"""The length task's sampling (benchmarks/compare.py), in llama.cpp's names."""


def convert(export: Path, out: Path, outtype: str) -> Path:
    if not CONVERTER.is_file():
        sys.exit(f"{CONVERTER}: not found — run `make gguf` first")
    env = {**os.environ, "PYTHONPATH": str(CONVERTER.parent / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(CONVERTER), str(export), "--outtype", outtype, "--outfile", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    return out


def answer(llm: Any, control: str, prompt: str, max_tokens: int, seed: int) -> tuple[str, list[int], str]:
    """(text, the generated token ids, finish reason) of one chat completion under ``control``."""
    seen: list[int] = []
    rendered: list[int] = []  # the prompt's length in tokens, once known

    def record(input_ids, scores):  # llama.cpp calls this before each sampled token: input_ids grows by one
        if not rendered:
            rendered.append(len(input_ids))  # the first call sees the rendered prompt (control tokens included) only
        seen[:] = [int(t) for t in input_ids[rendered[0] :]]
        return scores

    messages = [{"role": "system", "content": f"controls: {control}"}, {"role": "user", "content": prompt}]
    processors = llama_cpp.LogitsProcessorList([record])
    out = llm.create_chat_completion(messages, max_tokens=max_tokens, seed=seed, logits_processor=processors, **DECODING)
    choice = out["choices"][0]
    return choice["message"]["content"], seen, choice["finish_reason"]  # the last token is never seen: it ends the answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", type=Path, required=True)
    p.add_argument("--prompts", type=Path, required=True, help="JSONL with a 'prompt' per line (held-out prompts)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=30, help="prompts answered under each control")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--outtype", default="f16")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if "controls:" not in (args.export / "chat_template.jinja").read_text():
        sys.exit(f"{args.export}: its chat template predates the 'controls:' directive — export the run again")
    schema = json.loads((args.export / "meet_schema.json").read_text())
    control_ids = set(schema["vocabulary"]["token_ids"])
    prompts = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines() if line.strip()][: args.count]
    gguf = convert(args.export, args.out / f"model-{args.outtype}.gguf", args.outtype)
    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=args.threads, verbose=False, seed=args.seed)
    start = time.perf_counter()
    rows = {}
    for control in ("concise", "verbose"):
        rows[control] = [answer(llm, control, prompt, args.max_tokens, args.seed + i) for i, prompt in enumerate(prompts)]
    seconds = time.perf_counter() - start
    words = {c: [max(1, len(text.split())) for text, _, _ in rows[c]] for c in rows}
    logs = [math.log(v / c) for v, c in zip(words["verbose"], words["concise"], strict=True)]
    emitted = sum(len(control_ids & set(ids)) for c in rows for _, ids, _ in rows[c])
    result = {
        "export": str(args.export),
        "gguf": gguf.name,
        "prompts": len(prompts),
        "decoding": {**DECODING, "max_tokens": args.max_tokens},
        "median_ratio": statistics.median(words["verbose"]) / statistics.median(words["concise"]),
        "geo_ratio": math.exp(sum(logs) / len(logs)),
        "median_words": {c: statistics.median(w) for c, w in words.items()},
        "cap_share": {c: sum(r[2] == "length" for r in rows[c]) / len(rows[c]) for c in rows},
        "control_tokens_generated": emitted,
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, llama-cpp-python {llama_cpp.__version__}",
        "answers": {c: [text for text, _, _ in rows[c]] for c in rows},
    }
    (args.out / "gguf_check.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    lines = [
        f"GGUF ({args.outtype}) of `{args.export}` in llama-cpp-python, {len(prompts)} held-out prompts per control, "
        f"steered by the `controls:` system message through the GGUF's own chat template; sampled (T 0.7, top-p 0.9, "
        f"repeat penalty 1.1), {args.max_tokens} tokens at most; {result['machine']}, {seconds:.0f} s.",
        "",
        "| verbose/concise median word ratio | geometric-mean ratio | median words concise / verbose | reached the cap "
        "(concise / verbose) | control tokens generated |",
        "|---|---|---|---|---|",
        f"| {result['median_ratio']:.2f} | {result['geo_ratio']:.2f} | {result['median_words']['concise']:.0f} / "
        f"{result['median_words']['verbose']:.0f} | {result['cap_share']['concise']:.0%} / {result['cap_share']['verbose']:.0%} "
        f"| {emitted} |",
    ]
    (args.out / "gguf_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (args.out / gguf.name).unlink()  # hundreds of MB: not kept
    return 0


if __name__ == "__main__":
    sys.exit(main())

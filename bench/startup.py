"""Start-up: how long `tuneforge generate --max-new-tokens 1` takes from the shell, and where it goes.

Cold: a new cache folder (``TUNEFORGE_CACHE``), so the named model's GGUF file is converted to
safetensors first, as on a machine's first run. Warm: the cache filled, the median of a few runs,
alternating with the reference doing the same work from the shell: Transformers' ``AutoTokenizer`` and
``AutoModelForCausalLM`` read the same converted folder and ``generate`` one token of the same chat
prompt. Beside them, the floor no Transformers program goes below: ``python -c "import torch,
transformers"`` with the Auto classes and the default model's family (Llama) imported. Then one
process times the stages of tuneforge's warm start in order: the imports, Transformers' modules for
the model's family (which it imports when a config or tokenizer of that family is first read), the
tokenizer, the model, the first token.

    python bench/startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMAND = ["-m", "tuneforge", "generate", "--model", "smollm2-135m", "--prompt", "Hi", "--max-new-tokens", "1"]
REFERENCE = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()  # as tuneforge on a CPU
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=1, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
"""
# the default model's classes too: transformers imports a family's modules (and torch.distributed's tensor
# package under them) when it first meets that family, so every program that runs the model pays for them
FLOOR = "import torch, transformers; from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM"


def child() -> dict:
    """The stages of a warm start, timed in this process."""
    marks = [("start", time.perf_counter())]
    from tuneforge import cli  # noqa: F401  (the command line's own imports)
    from tuneforge.eval.generate import generate
    from tuneforge.io.load import load_model, load_tokenizer, resolve_spec
    marks.append(("imports", time.perf_counter()))
    path = resolve_spec("smollm2-135m")
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(path))]  # imports the family's modules
    marks.append(("Transformers' modules for the model's family (imported on first use)", time.perf_counter()))
    load_tokenizer(path)
    marks.append(("tokenizer", time.perf_counter()))
    model, tokenizer = load_model("smollm2-135m")
    marks.append(("model (tokenizer again inside)", time.perf_counter()))
    generate(model, tokenizer, "Hi", max_new_tokens=1)
    marks.append(("first token", time.perf_counter()))
    return {"stages": {name: b - a for (_, a), (name, b) in zip(marks, marks[1:])}}


def timed(env: dict, command: list[str] = COMMAND) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm", type=int, default=5, help="warm runs")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child()))
        return

    from bench.report import machine, spawn, write_section

    from tuneforge.io.load import resolve_spec

    with tempfile.TemporaryDirectory() as cache:
        cold = timed({**os.environ, "TUNEFORGE_CACHE": cache})
    env, folder = dict(os.environ), str(resolve_spec("smollm2-135m"))
    runs = {"tuneforge": [], "reference": [], "floor": []}
    for _ in range(args.warm):  # alternating, so that a drift in the machine's load falls on every side
        runs["tuneforge"].append(timed(env))
        runs["reference"].append(timed(env, ["-c", REFERENCE, folder]))
        runs["floor"].append(timed(env, ["-c", FLOOR]))
    warm = {side: statistics.median(times) for side, times in runs.items()}
    result = spawn(__file__, ["--child"], REPO)
    if "error" in result:
        sys.exit(f"the stages' run: {result['error']}")
    stages = result["stages"]
    shown = {side: ", ".join(f"{t:.1f}" for t in times) for side, times in runs.items()}
    print(f"cold {cold:.1f} s; warm: " + "; ".join(f"{side} {warm[side]:.1f} s ({shown[side]})" for side in runs))
    print(stages)
    rows = "\n".join(f"| {name} | {seconds:.2f} |" for name, seconds in stages.items())
    write_section("startup", f"""
## Start-up: `tuneforge generate --model smollm2-135m --prompt Hi --max-new-tokens 1`

`python bench/startup.py` on {machine()}: wall time from the shell, medians of {args.warm} runs of each,
alternating.

| | seconds | runs |
|---|---|---|
| tuneforge, cold (an empty cache: the GGUF file converted to safetensors first) | {cold:.1f} | |
| tuneforge, warm (the cache filled) | {warm["tuneforge"]:.1f} | {shown["tuneforge"]} |
| reference, warm: Transformers reads the converted folder and generates one token | {warm["reference"]:.1f} | {shown["reference"]} |
| floor: `import torch, transformers`, the Auto classes and Llama's, nothing loaded | {warm["floor"]:.1f} | {shown["floor"]} |

tuneforge's warm start over the reference's: {warm["tuneforge"] / warm["reference"]:.2f}x; over the floor:
{warm["tuneforge"] / warm["floor"]:.2f}x. Where tuneforge's warm start goes, stage by stage in one process
(the tokenizer is read a second time inside the model's stage, as `load_model` reads it):

| stage | seconds |
|---|---|
{rows}
""")


if __name__ == "__main__":
    main()

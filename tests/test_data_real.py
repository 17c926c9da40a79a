"""The data forms people publish, trained on the real default model through `tuneforge train`: ShareGPT,
an OpenAI chat with a tool call and its result, a Parquet file and a `datasets` save_to_disk folder.
Each run is LoRA for two steps; the summary must show every row read and a finite loss."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tuneforge import cli

pytestmark = pytest.mark.real

SHAREGPT = [{"conversations": [{"from": "system", "value": "Answer briefly."},
                               {"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS = [{"tools": [WEATHER], "messages": [
    {"role": "user", "content": f"What is the weather in {city}?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
    {"role": "tool", "name": "get_weather", "content": f"{degrees} degrees and sunny"},
    {"role": "assistant", "content": f"It is {degrees} degrees and sunny in {city}."}]}
    for city, degrees in [("Paris", 21), ("Oslo", 9), ("Lima", 18), ("Cairo", 33), ("Quito", 14), ("Perth", 25),
                          ("Tunis", 27), ("Riga", 4)]]  # all different: a held-out copy of a training row is dropped
CHATS = [{"messages": [{"role": "user", "content": f"Name a colour, number {i}."},
                       {"role": "assistant", "content": ["Red.", "Blue.", "Green.", "Amber."][i % 4]}]}
         for i in range(8)]


def write(tmp_path, kind: str) -> str:
    if kind in ("sharegpt", "tools"):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in (SHAREGPT if kind == "sharegpt" else TOOLS)))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "chats.parquet"
        pq.write_table(pa.Table.from_pylist(CHATS), path)
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "chats"
        datasets.Dataset.from_list(CHATS).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["sharegpt", "tools", "parquet", "datasets"])
def test_each_form_trains_on_the_default_model(kind, tmp_path):
    # SmolLM2's chat template renders no tool calls, so the tool-call data trains in the plain layout
    # (tool calls as JSON text); with the template the run is refused, never trained without them.
    data = {"path": write(tmp_path, kind), "format": "instruction", "max_length": 128, "val_fraction": 0.25,
            **({"chat_template": False} if kind == "tools" else {})}
    cfg = {"model": "smollm2-135m", "method": {"name": "lora", "r": 4}, "data": data,
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_examples"] + summary["eval_examples"] == 8
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    if kind == "tools":
        del data["chat_template"]
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "output_dir":
                                                                             str(tmp_path / "refused")}}))
        assert cli.main(["train", str(tmp_path / "run.yaml")]) == 2

"""A tiny model of each chat-template family trains on a messages-format file and then generates until its own
end-of-turn token, through the same code as serving (the adapter on its base, medtune.inference.decoding)."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.training.config import parse_recipe

from families import END_OF_TURN, FAMILIES, build_model

pytestmark = pytest.mark.slow


def messages_file(path, sample_train_file) -> list[list[dict]]:
    """The sample's MedNLI rows (one-word replies, quick to learn) as OpenAI-style conversations, some multi-turn
    with a system turn."""
    rows = [json.loads(line) for line in sample_train_file.read_text().splitlines() if '"source": "MedNLI"' in line]
    conversations = [[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                      {"role": "assistant", "content": r["output"]}] for r in rows]
    conversations += [[{"role": "system", "content": "Answer in one word."}, *a, *b]
                      for a, b in zip(conversations[::2], conversations[1::2])]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return conversations


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_on_conversations_and_stops_at_its_own_end_of_turn(family, tmp_path, sample_train_file):
    from medtune.inference.decoding import complete
    from medtune.inference.load import load_for_inference
    from medtune.training.train import train

    model_dir = build_model(family, tmp_path / "model")
    conversations = messages_file(tmp_path / "chat.jsonl", sample_train_file)
    recipe = parse_recipe([
        "--config", "configs/recipes/tiny.yaml", "--model_name_or_path", str(model_dir),
        "--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache"),
        "--dataset_name", str(tmp_path / "chat.jsonl"), "--eval_split", "none", "--max_seq_length", "256",
        "--max_steps", "40", "--learning_rate", "2e-2", "--logging_steps", "1", "--save_strategy", "no",
        "--sample_prompt", "", "--generation_eval_samples", "0",
    ])
    result = train(recipe)
    assert result.preempted is False
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3

    model, fmt = load_for_inference(result.output_dir, device="cpu")
    assert fmt.end_of_turn == END_OF_TURN[family]
    torch.manual_seed(0)
    prompts = [c[:1] for c in conversations[:4]]
    for completion in complete(model, fmt, prompts, max_new_tokens=24):
        assert completion.finish_reason == "stop" and completion.completion_tokens < 24, completion

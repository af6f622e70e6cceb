"""Merging a LoRA adapter into the tiny base and loading the result with plain transformers."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.chat_format import END_OF_TURN, encode_messages
from medtune.export import DISCLAIMER, export, main
from medtune.inference import load_for_inference

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONVERSATION = [{"role": "user", "content": "I have a rash on my arm that itches at night."}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A tiny LoRA adapter laid out like the training output: adapter files, tokenizer, recipe, metrics."""
    out = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make it change the model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    (out / "tiny.yaml").write_text("model_name_or_path: .cache/tiny-starling\n"
                                   "dataset_name: data/sample/medtuned_sample.jsonl\nlora_r: 8\n")
    (out / "all_results.json").write_text(json.dumps({"eval_loss": 2.5, "epoch": 1.0}))
    return out


def logits(model, tok):
    ids = torch.tensor([encode_messages(tok, CONVERSATION)])
    with torch.no_grad():
        return model(ids).logits


def test_adapter_loads_on_base_without_merging(adapter_dir, tiny_model_dir):
    model, tok = load_for_inference(adapter_dir, device="cpu")
    base, _ = load_for_inference(tiny_model_dir, device="cpu")
    assert isinstance(model, PeftModel)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)
    assert not torch.allclose(logits(model, tok), logits(base, tok), atol=1e-3)


def test_merged_export_matches_adapter_on_base(adapter_dir, tiny_model_dir, tmp_path):
    out = export(adapter_dir, tmp_path / "merged", dtype="float32")
    assert list(out.glob("*.safetensors")) and (out / "tokenizer_config.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted, _ = load_for_inference(adapter_dir, device="cpu")
    torch.testing.assert_close(logits(merged, tok), logits(adapted, tok), atol=1e-4, rtol=1e-4)

    assert merged.generation_config.eos_token_id == tok.convert_tokens_to_ids(END_OF_TURN) == 32000
    assert tok.eos_token == END_OF_TURN
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True).endswith(
        "GPT4 Correct Assistant:")

    card = (out / "README.md").read_text()
    for expected in (f"base_model: {tiny_model_dir}", DISCLAIMER, "data/sample/medtuned_sample.jsonl",
                     "lora_r: 8", "| eval_loss | 2.5 |"):
        assert expected in card
    metadata = ModelCard.load(out / "README.md").data  # the Hub's own reader of the card's metadata
    assert (metadata.base_model, metadata.pipeline_tag) == (str(tiny_model_dir), "text-generation")
    assert "medical" in metadata.tags and metadata.datasets is None  # a local data file is no Hub dataset id


def test_cli_bf16_export_loads(adapter_dir, tmp_path, capsys):
    main([str(adapter_dir), "--out", str(tmp_path / "bf16"), "--max-shard-size", "5MB"])
    assert "merged model written" in capsys.readouterr().out
    assert len(list((tmp_path / "bf16").glob("model-*.safetensors"))) > 1  # sharded
    model, tok = load_for_inference(tmp_path / "bf16", device="cpu")
    assert model.dtype == torch.float32  # CPU inference upcasts
    assert (tmp_path / "bf16" / "generation_config.json").is_file()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_rejects_a_folder_without_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        export(tiny_model_dir, tmp_path / "x")

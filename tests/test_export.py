"""Merging a LoRA adapter into the tiny base and loading the result with plain transformers."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from medtune.inference.chat_format import ChatFormat
from medtune.export.merge import export, main
from medtune.export.model_card import DISCLAIMER
from medtune.inference.load import load_for_inference

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
    run_info = {"recipe": {"path": "configs/recipes/tiny.yaml",
                           "data": {"dataset_name": "data/sample/medtuned_sample.jsonl"},
                           "model": {"model_name_or_path": str(tiny_model_dir), "lora_r": 8}},
                "data": {"rows_read": 203, "rows_kept": 201, "skipped": {"empty_output": 2}, "tokens": 47000}}
    (out / "run_info.json").write_text(json.dumps(run_info))
    (out / "all_results.json").write_text(json.dumps({"eval_loss": 2.5, "epoch": 1.0}))
    (out / "eval.json").write_text(json.dumps({
        "data": "data/sample/medtuned_sample_eval.jsonl", "rows": 58,
        "families": {"nli": {"n": 4, "primary": "accuracy", "accuracy": 0.75}},
        "overall": {"n": 58, "loss": 1.25},
        "baseline": {"families": {"nli": {"n": 4, "primary": "accuracy", "accuracy": 0.25}},
                     "overall": {"n": 58, "loss": 2.5}}}))
    return out


def logits(model, fmt):
    ids = torch.tensor([fmt.prompt_ids(CONVERSATION)])
    with torch.no_grad():
        return model(ids).logits


def test_adapter_loads_on_base_without_merging(adapter_dir, tiny_model_dir):
    model, fmt = load_for_inference(adapter_dir, device="cpu")
    base, _ = load_for_inference(tiny_model_dir, device="cpu")
    assert isinstance(model, PeftModel)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir)
    assert not torch.allclose(logits(model, fmt), logits(base, fmt), atol=1e-3)


def test_merged_export_matches_adapter_on_base(adapter_dir, tiny_model_dir, tmp_path):
    out = export(adapter_dir, tmp_path / "merged", dtype="float32")
    assert list(out.glob("*.safetensors")) and (out / "tokenizer_config.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted, fmt = load_for_inference(adapter_dir, device="cpu")
    torch.testing.assert_close(logits(merged, fmt), logits(adapted, fmt), atol=1e-4, rtol=1e-4)

    assert merged.generation_config.eos_token_id == fmt.end_of_turn_id == 32000

    card = (out / "README.md").read_text()
    for expected in (f"base_model: {tiny_model_dir}", DISCLAIMER, "data/sample/medtuned_sample.jsonl",
                     "201 of 203 training rows kept, 2 skipped", "| lora_r | 8 |", "| eval_loss | 2.5 |",
                     "| nli | accuracy | 4 | 0.25 | 0.75 |", "| all | reply loss | 58 | 2.5 | 1.25 |",
                     "`<|end_of_turn|>` (ids [32000]"):
        assert expected in card
    metadata = ModelCard.load(out / "README.md").data  # the Hub's own reader of the card's metadata
    assert (metadata.base_model, metadata.pipeline_tag) == (str(tiny_model_dir), "text-generation")
    assert "medical" in metadata.tags and metadata.datasets is None  # a local data file is no Hub dataset id


def test_the_exported_folder_renders_the_training_ids_the_way_vllm_does(adapter_dir, tmp_path):
    """vLLM's chat endpoint (vllm/renderers/hf.py, 0.34) takes the prompt ids from the tokenizer folder's
    apply_chat_template(..., tokenize=True, add_generation_prompt=True), which tokenizes the rendered text with
    add_special_tokens=False; they must be the ids training put before each reply."""
    out = export(adapter_dir, tmp_path / "merged", dtype="float32")
    served = AutoTokenizer.from_pretrained(out)
    trained = ChatFormat(AutoTokenizer.from_pretrained(adapter_dir))
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATION,
                    {"role": "assistant", "content": "Since when?"}, {"role": "user", "content": "A week."},
                    {"role": "assistant", "content": "See a doctor."}]
    encoded = trained.encode([conversation])[0]
    for n in (2, 4):  # before each reply
        prompt = served.apply_chat_template(conversation[:n], tokenize=True, add_generation_prompt=True)["input_ids"]
        assert prompt == encoded.input_ids[:len(prompt)] and encoded.mask[len(prompt)] == 1
        assert encoded.mask[len(prompt) - 1] == 0
    assert GenerationConfig.from_pretrained(out).eos_token_id == trained.end_of_turn_id


def test_cli_bf16_export_loads(adapter_dir, tmp_path, capsys):
    main([str(adapter_dir), "--out", str(tmp_path / "bf16"), "--max-shard-size", "5MB"])
    assert "merged model written" in capsys.readouterr().out
    assert len(list((tmp_path / "bf16").glob("model-*.safetensors"))) > 1  # sharded
    model, _ = load_for_inference(tmp_path / "bf16", device="cpu")
    assert model.dtype == torch.float32  # CPU inference upcasts
    assert (tmp_path / "bf16" / "generation_config.json").is_file()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_rejects_a_folder_without_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        export(tiny_model_dir, tmp_path / "x")


QLORA_MODEL = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
               "bnb_4bit_quant_storage": None}


@pytest.fixture(scope="module")
def qlora_adapter_dir(adapter_dir, tmp_path_factory):
    """The same adapter, as a run on an NF4 base (double quantization) records it in run_info.json."""
    import shutil

    out = tmp_path_factory.mktemp("qlora") / "adapter"
    shutil.copytree(adapter_dir, out)
    run_info = json.loads((out / "run_info.json").read_text())
    run_info["recipe"]["model"] |= QLORA_MODEL
    (out / "run_info.json").write_text(json.dumps(run_info))
    return out


def test_an_adapter_trained_on_a_4bit_base_runs_and_exports_on_the_weights_it_was_trained_against(
        qlora_adapter_dir, tiny_model_dir, tmp_path):
    from medtune.training.config import parse_recipe
    from medtune.training.model import load_model

    recipe = parse_recipe(["--config", "configs/recipes/tiny.yaml", "--model_name_or_path", str(tiny_model_dir),
                           *[a for k, v in QLORA_MODEL.items() if v is not None for a in (f"--{k}", str(v))]])
    on_4bit = PeftModel.from_pretrained(load_model(recipe), qlora_adapter_dir).eval()  # as in training
    as_trained, fmt = load_for_inference(qlora_adapter_dir, device="cpu")
    original, _ = load_for_inference(qlora_adapter_dir, device="cpu", as_trained=False)
    torch.testing.assert_close(logits(as_trained, fmt), logits(on_4bit, fmt), atol=1e-5, rtol=1e-5)
    assert (logits(original, fmt) - logits(on_4bit, fmt)).abs().max() > 1e-2  # NF4's error, uncorrected

    out = export(qlora_adapter_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, fmt), logits(on_4bit, fmt), atol=1e-4, rtol=1e-4)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # a plain float model
    assert "quantised as in training (bitsandbytes 4-bit NF4 with double quantization)" in (
        out / "README.md").read_text()

    main([str(qlora_adapter_dir), "--out", str(tmp_path / "original"), "--dtype", "float32",
          "--adapter-base", "original"])
    merged_original = AutoModelForCausalLM.from_pretrained(tmp_path / "original")
    torch.testing.assert_close(logits(merged_original, fmt), logits(original, fmt), atol=1e-4, rtol=1e-4)
    assert "quantised as in training" not in (tmp_path / "original" / "README.md").read_text()


def test_eval_of_a_qlora_adapter_compares_it_with_the_original_base(qlora_adapter_dir, tiny_model_dir, tmp_path,
                                                                    sample_eval_file):
    """The baseline is the base as it is, not its quantised round trip (which disabling the adapter would give)."""
    from medtune.data.select import load_rows, select_rows
    from medtune.eval import run
    from medtune.eval.generate import mean_reply_loss

    run.main(["--model", str(qlora_adapter_dir), "--baseline", "--data", str(sample_eval_file), "--max-samples", "4",
              "--max-new-tokens", "2", "--out", str(tmp_path / "report"), "--device", "cpu"])
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    rows = select_rows(load_rows(str(sample_eval_file))[0], 4)
    base, base_fmt = load_for_inference(tiny_model_dir, device="cpu")
    tuned, fmt = load_for_inference(qlora_adapter_dir, device="cpu")
    assert report["adapter_base"] == "as-trained"
    assert report["baseline"]["overall"]["loss"] == pytest.approx(mean_reply_loss(base, base_fmt, rows), abs=1e-5)
    assert report["overall"]["loss"] == pytest.approx(mean_reply_loss(tuned, fmt, rows), abs=1e-5)


def test_the_adapter_card_names_every_dataset_with_its_licence_and_both_tables(adapter_dir, tmp_path):
    import shutil

    from medtune.export.model_card import write_adapter_card

    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    (folder / "README.md").write_text("# Model Card for adapter\n\nfine-tuned version of [None]\n")  # TRL's
    run_info = json.loads((folder / "run_info.json").read_text())
    run_info["recipe"]["data"] = {"dataset_name": "nlpie/Llama2-MedTuned-Instructions",
                                  "eval_dataset_name": "data/sample/medtuned_sample_eval.jsonl",
                                  "consultation_eval_dataset": "/somewhere/clinic_vignettes.jsonl"}
    (folder / "run_info.json").write_text(json.dumps(run_info))
    report = json.loads((folder / "eval.json").read_text())
    consult = {"n_triage": 48, "n_emergencies": 16, "safety": 0.5, "triage_accuracy": 0.25,
               "emergency_recall": 0.75}
    report["families"]["consultation"] = {"n": 48, "primary": "safety", "questions": {"consult": consult}}
    report["baseline"]["families"]["consultation"] = {"n": 48, "primary": "safety", "questions": {
        "consult": {**consult, "safety": 0.125, "emergency_recall": 0.8125}}}
    (folder / "eval.json").write_text(json.dumps(report))

    card = write_adapter_card(folder).read_text()
    for expected in ("(LoRA adapter)", DISCLAIMER,
                     "| `nlpie/Llama2-MedTuned-Instructions` | training | CC-BY-NC-4.0: non-commercial use only, "
                     "and the tuned weights inherit it |",
                     "| `data/sample/medtuned_sample_eval.jsonl` | evaluation | Apache-2.0 (written for medtune) |",
                     "| `/somewhere/clinic_vignettes.jsonl` | consultation evaluation | not known to medtune",
                     "**Licence of these weights:** CC-BY-NC-4.0", "| nli | accuracy | 4 | 0.25 | 0.75 |",
                     "### Symptom consultation", "| consult | safety | 48 | 0.125 | 0.5 |",
                     "| consult | emergency_recall | 16 | 0.8125 | 0.75 |", "From `configs/recipes/tiny.yaml`"):
        assert expected in card
    assert "[None]" not in card
    metadata = ModelCard.load(folder / "README.md").data
    assert metadata.license == "cc-by-nc-4.0" and metadata.datasets == ["nlpie/Llama2-MedTuned-Instructions"]
    assert metadata.library_name == "peft"

    # a mixture (the demo's form): every entry named in place of dataset_name, with its use and licence
    run_info["recipe"]["data"] = {"dataset_name": "nlpie/Llama2-MedTuned-Instructions", "datasets": [
        {"path": "nlpie/Llama2-MedTuned-Instructions", "fraction": 0.7},
        {"path": "data/vignettes/train.jsonl", "self_distill": {}, "fraction": 0.2},
        {"replay": {"prompts": "data/prompts/health_questions.jsonl"}, "fraction": 0.1}]}
    (folder / "run_info.json").write_text(json.dumps(run_info))
    card = write_adapter_card(folder).read_text()
    for expected in ("| `nlpie/Llama2-MedTuned-Instructions` | training, fraction 0.7 | CC-BY-NC-4.0",
                     "| `data/vignettes/train.jsonl` | training (self-distilled by the base model), fraction 0.2 | "
                     "Apache-2.0 (written for medtune) |",
                     "| `data/prompts/health_questions.jsonl` | training: prompts of the base model's replayed "
                     "replies, fraction 0.1 | Apache-2.0 (written for medtune) |",
                     "**Licence of these weights:** CC-BY-NC-4.0"):
        assert expected in card
    assert card.count("nlpie/Llama2-MedTuned-Instructions` |") == 1
    assert "`nlpie/Llama2-MedTuned-Instructions`, `data/vignettes/train.jsonl`, " \
           "`data/prompts/health_questions.jsonl`" in card  # the card's "trained on" line

    # medtune-eval without --baseline: its report's baseline is null, the card shows the tuned column alone
    (folder / "eval.json").write_text(json.dumps({**report, "baseline": None}))
    card = write_adapter_card(folder).read_text()
    assert "| nli | accuracy | 4 | – | 0.75 |" in card and "| consult | safety | 48 | – | 0.5 |" in card

"""Monitoring: FLOP formula, token counting, the metrics callback on a real forward loop, W&B configuration."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM, TrainerControl, TrainerState
from transformers.integrations import WandbCallback
from trl import ModelConfig, SFTConfig

from conftest import ROOT, free_port
from medtune import monitoring
from medtune.training.arguments import (AfterTrainingArguments, CheckpointArguments, DataArguments, MonitoringArguments,
                                       Recipe)
from medtune.monitoring import FlopModel, ThroughputCallback, batch_counts, peak_flops

PAD = 31
TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, tie_word_embeddings=False, pad_token_id=PAD)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(**config):
    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(**{**TINY, **config}))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))


def expected_counts(config: dict, r: int = 4) -> tuple[int, int]:
    """Hand count of frozen matmul weights (+ norms) and LoRA weights of the TINY Mistral."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    layers = config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # (in, out) of each targeted linear
    base = layers * (sum(a * b for a, b in shapes) + 2 * h) + h + h * v  # + 2 norms/layer, final norm, lm_head
    lora = layers * sum(r * (a + b) for a, b in shapes)
    return base, lora


def test_flop_formula_by_hand():
    flops = FlopModel(n_base=1000, n_lora=10, n_layers=2, hidden=8)
    assert flops.batch(tokens=5, sum_sq_lengths=5**2) == 5 * (4 * 1000 + 6 * 10 + 12 * 2 * 8 * 5)
    # Two samples of lengths 3 and 5: every token pays for attention over its own sample only.
    assert flops.batch(tokens=8, sum_sq_lengths=3**2 + 5**2) == flops.batch(3, 3**2) + flops.batch(5, 5**2)


def test_flop_model_counts_base_and_lora_parameters():
    model = lora_model()
    flops = FlopModel.from_model(model)
    assert (flops.n_base, flops.n_lora) == expected_counts(TINY)
    assert (flops.n_layers, flops.hidden) == (2, 16)


def test_flop_model_of_starling_7b():
    """Starling-LM-7B-alpha's shape (on the meta device): every linear weight incl. lm_head, plus the norms."""
    from medtune.tiny import STARLING_CONFIG

    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**STARLING_CONFIG))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = (2 * STARLING_CONFIG["num_hidden_layers"] + 1) * STARLING_CONFIG["hidden_size"]
    flops = FlopModel.from_model(model.requires_grad_(False))
    assert (flops.n_base, flops.n_lora) == (linear + norms, 0)
    assert 7.0e9 < linear < 7.2e9


def test_flop_model_counts_4bit_weights_at_full_size(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = {**TINY, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32}
    MistralForCausalLM(MistralConfig(**config)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    model = get_peft_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())
    flops = FlopModel.from_model(model)
    assert (flops.n_base, flops.n_lora) == expected_counts(config)


def test_peak_flops_table_and_override():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10G") == 125e12
    assert peak_flops("Tesla T4") == 65e12
    assert peak_flops("Tesla V100-SXM2-16GB") == 125e12
    assert peak_flops(None) is None and peak_flops("some new accelerator") is None
    assert peak_flops("NVIDIA A100-SXM4-80GB", peak_tflops=2.0) == 2e12


def test_batch_counts_packed_padded_and_padding_free():
    # Packed row: samples of 3 and 2 tokens, then 3 pad slots (pad id, position 0).
    ids = torch.tensor([[5, 6, 7, 8, 9, PAD, PAD, PAD]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    assert batch_counts(ids, position_ids=pos, pad_token_id=PAD).tolist() == [5, 2, 3**2 + 2**2]
    # Padded batch with attention_mask, no position ids: one sample per row.
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert batch_counts(ids, attention_mask=mask).tolist() == [5, 2, 3**2 + 2**2]
    # Padding-free (flattened) batch: three samples of 4, 1 and 2 tokens.
    pos = torch.tensor([[0, 1, 2, 3, 0, 0, 1]])
    assert batch_counts(torch.full((1, 7), 4), position_ids=pos, pad_token_id=PAD).tolist() == [7, 3, 16 + 1 + 4]
    # The pad id is also the end-of-turn token that ends each sample (Starling, Llama-3): those ends are real.
    ids = torch.tensor([[5, 6, PAD, 8, PAD, PAD, PAD]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])
    assert batch_counts(ids, position_ids=pos, pad_token_id=PAD).tolist() == [5, 2, 3**2 + 2**2]
    ids = torch.tensor([[5, 6, PAD, PAD], [5, PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert batch_counts(ids, attention_mask=mask, pad_token_id=PAD).tolist() == [5, 2, 3**2 + 2**2]


def drive(callback, model, batches, args, state, steps_per_log=2):
    """The Trainer's call sequence for a training loop; returns the log dicts."""
    control = TrainerControl()
    callback.on_train_begin(args, state, control, model=model, processing_class=SimpleNamespace(pad_token_id=PAD))
    logs = []
    model.train()
    for batch in batches:
        callback.on_step_begin(args, state, control)
        model(**batch).logits.sum().backward()
        state.global_step += 1
        callback.on_step_end(args, state, control)
        if state.global_step % steps_per_log == 0:
            log = {"loss": 1.0, "learning_rate": 1e-3}
            state.log_history.append({**log, "step": state.global_step})
            callback.on_log(args, state, control, logs=log)
            logs.append(log)
    with torch.no_grad():  # an eval forward must not count
        model.eval()
        model(**batches[0])
    callback.on_train_end(args, state, control)
    return logs


def test_throughput_callback_metrics(tmp_path):
    model = lora_model()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=8, report_to="none",
                     bf16=False)
    state = TrainerState(max_steps=4)
    # Each batch: 2 packed rows of 8 slots holding samples of 3+4 and 5 tokens (12 real tokens, 3 samples).
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, PAD], [1, 2, 3, 4, 5, PAD, PAD, PAD]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 0, 0]])
    batch = {"input_ids": ids, "position_ids": pos}
    callback = ThroughputCallback(peak_tflops=1.0)
    logs = drive(callback, model, [batch] * 4, args, state)

    assert len(logs) == 2
    for log in logs:
        assert log["tokens_per_second"] > 0 and log["samples_per_second"] > 0
        assert log["tokens_per_second"] / log["samples_per_second"] == pytest.approx(12 / 3)
        assert log["tokens_per_second_per_device"] == log["tokens_per_second"]  # one process
        assert log["packing_efficiency"] == pytest.approx(12 / 16)
        assert 0 < log["mfu"] < 1
        flops = FlopModel.from_model(model).batch(2 * 12, 2 * (9 + 16 + 25))
        assert log["mfu"] == pytest.approx(flops / (2 * log["step_time"] * 1e12))
        assert log["memory_peak_gb"] >= log["memory_gb"] > 0
        assert log["step_time"] > 0 and log["eta_seconds"] >= 0
    assert [log["progress"] for log in logs] == [0.5, 1.0]
    assert logs[-1]["eta_seconds"] == 0
    assert state.log_history[-1]["tokens_per_second"] == logs[-1]["tokens_per_second"]
    assert callback._hook is None  # removed at the end


def test_no_mfu_without_known_peak(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, max_length=4, report_to="none",
                     bf16=False)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    logs = drive(ThroughputCallback(), lora_model(), [batch] * 2, args, TrainerState(max_steps=2))
    assert "mfu" not in logs[0] and logs[0]["tokens_per_second"] > 0


def make_recipe(tmp_path, report_to="wandb", resume=False, **monitoring_args) -> Recipe:
    training = SFTConfig(output_dir=str(tmp_path / "out"), report_to=report_to, max_length=64, bf16=False)
    return Recipe(data=DataArguments(), model=ModelConfig(), training=training,
                  checkpointing=CheckpointArguments(resume=resume), after_training=AfterTrainingArguments(),
                  monitoring=MonitoringArguments(**monitoring_args))


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """A clean WANDB_* environment with no credentials and config/cache files kept in tmp_path.

    configure_wandb writes os.environ itself, so the whole environment is restored afterwards."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_configure_wandb_offline_without_credentials(wandb_env, tmp_path, caplog):
    recipe = make_recipe(tmp_path, wandb_project="proj", wandb_tags="a,b", wandb_group="g")
    with caplog.at_level(logging.INFO, logger="medtune.monitoring"):
        use_wandb = monitoring.configure_wandb(recipe)
    assert os.environ["WANDB_MODE"] == "offline"
    assert "wandb sync" in caplog.text
    assert [os.environ[k] for k in ("WANDB_PROJECT", "WANDB_TAGS", "WANDB_RUN_GROUP")] == ["proj", "a,b", "g"]
    assert os.environ["WANDB_DIR"] == recipe.training.output_dir  # offline runs land next to the checkpoints
    assert use_wandb and recipe.training.report_to == ["wandb"]  # the recipe is read, not changed
    assert "WANDB_RUN_ID" not in os.environ


def test_configure_wandb_keeps_environment_and_explicit_mode(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_PROJECT", "from-env")
    wandb_env.setenv("WANDB_MODE", "online")
    monitoring.configure_wandb(make_recipe(tmp_path))
    assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_MODE"]) == ("from-env", "online")


def test_configure_wandb_off(wandb_env, tmp_path):
    recipe = make_recipe(tmp_path, report_to="none")
    assert not monitoring.configure_wandb(recipe) and "WANDB_MODE" not in os.environ
    wandb_env.setenv("WANDB_MODE", "disabled")
    recipe = make_recipe(tmp_path, report_to=["wandb", "tensorboard"])
    assert not monitoring.configure_wandb(recipe)


def test_configure_wandb_without_wandb_installed(wandb_env, tmp_path, caplog):
    wandb_env.setitem(__import__("sys").modules, "wandb", None)  # makes `import wandb` fail
    recipe = make_recipe(tmp_path)
    use_wandb = monitoring.configure_wandb(recipe)
    assert "cannot be imported" in caplog.text
    assert not use_wandb
    assert not [c for c in monitoring.monitoring_callbacks(recipe, None, use_wandb) if isinstance(c, WandbCallback)]


def test_configure_wandb_resume_uses_newest_checkpoint_run_id(wandb_env, tmp_path):
    out = tmp_path / "out"
    for step, run_id in ((2, "old"), (10, "newest"), (12, None)):  # checkpoint-12 is incomplete: no id file
        (out / f"checkpoint-{step}").mkdir(parents=True)
        if run_id:
            (out / f"checkpoint-{step}" / monitoring.RUN_ID_FILE).write_text(run_id)
    monitoring.configure_wandb(make_recipe(tmp_path, resume=True))
    assert (os.environ["WANDB_RUN_ID"], os.environ["WANDB_RESUME"]) == ("newest", "allow")


# ---- Full training runs (launch/train.py on the tiny model) -------------------------------------------------------

RUN = ["--max_steps", "6", "--logging_steps", "2", "--eval_steps", "3", "--save_strategy", "steps",
       "--save_steps", "3", "--sample_prompt", "", "--peak_tflops", "1"]


def launch_machines(args: list[str], tmp_path, processes: int = 1, machines: int = 1, **env) -> list[str]:
    """Run launch/train.py (under `accelerate launch` for several CPU processes, one launcher per machine, all on
    this host); returns the output of each machine."""
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env = {**clean, "HOME": str(tmp_path / "home"), "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-home"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-home"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-home"), "OMP_NUM_THREADS": "1", **env}
    if processes > 1:  # `--cpu` would start a single process: torchrun-style launch + a CPU Trainer instead
        port = free_port()
        cmds = [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                 "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                 "launch/train.py", *args, "--use_cpu", "true"] for rank in range(machines)]
    else:
        cmds = [[sys.executable, "launch/train.py", *args]]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def launch(args: list[str], tmp_path, processes: int = 1, **env) -> str:
    return "".join(launch_machines(args, tmp_path, processes, **env))


def run_dirs(tmp_path):
    return sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_two_process_run_logs_one_wandb_run_with_throughput_metrics(tiny_args, tmp_path):
    from medtune.monitoring.report import load_history, main as report_main, plot_report, wandb_records

    output = launch([*tiny_args, *RUN, "--report_to", "wandb", "--save_total_limit", "2"], tmp_path, processes=2,
                    WANDB_MODE="offline")
    (run_dir,) = run_dirs(tmp_path)  # exactly one run for the two ranks
    rows = load_history(run_dir)  # wandb's own transaction-log reader
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    previous_tokens = 0
    for row in train:
        for key in ("grad_norm", "learning_rate", "epoch", "step_time", "packing_efficiency", "eta_seconds"):
            assert key in row, key
        assert row["tokens_per_second"] > 0 and row["samples_per_second"] > 0
        assert row["tokens_per_second_per_device"] == pytest.approx(row["tokens_per_second"] / 2)
        assert 0 < row["mfu"] < 1
        assert row["memory_peak_gb"] >= row["memory_gb"] > 0
        assert 0 < row["packing_efficiency"] <= 1
        # Real tokens counted by the monitoring hook on both ranks == TRL's own all-rank token counter.
        tokens = row["tokens_per_second"] * row["step_time"] * 2
        assert tokens == pytest.approx(row["num_tokens"] - previous_tokens, rel=1e-6)
        previous_tokens = row["num_tokens"]
    assert train[-1]["progress"] == 1.0

    (config,) = [c for c in wandb_records(run_dir, "config") if "medtune" in json.dumps(c)]
    info = config["update"]["medtune"]
    assert info["hardware"]["world_size"] == 2 and info["data"]["fingerprint"]
    assert info["recipe"]["training"]["max_steps"] == 6 and "wandb" in info["versions"]
    # The recipe's values, not the Trainer's adjusted ones (medtune rotates the checkpoints itself).
    assert config["update"]["save_total_limit"] == 2 and info["recipe"]["training"]["save_total_limit"] == 2
    assert info["adjusted"]["save_total_limit"]["used"] is None
    (artifact,) = wandb_records(run_dir, "artifact")
    assert artifact["type"] == "model" and any(f["path"] == "adapter_model.safetensors"
                                               for f in artifact["manifest"]["contents"])
    run_id = run_dir.name.split("-")[-1]
    out = Path(tiny_args[tiny_args.index("--output_dir") + 1])
    assert (out / "checkpoint-3" / "wandb_run_id.txt").read_text() == run_id
    assert json.loads((out / "run_info.json").read_text())["hardware"]["world_size"] == 2

    # Non-main ranks print warnings only, marked with their rank, and their CPU affinity once; the metric lines are
    # printed once.
    rank1_info = [line for line in output.splitlines() if "[rank 1]" in line and " INFO " in line]
    assert len(rank1_info) == 1 and "rank 1 on " in rank1_info[0] and "CPU affinity" in rank1_info[0]
    assert output.count("CPU affinity") == 2
    assert output.count("W&B run ") == 1
    assert output.count("{'loss': ") == 3 and output.count("{'eval_loss': ") == 2

    # The report of the output_dir plots exactly the logged losses (compared with the checkpoint's trainer state).
    report_main(["--run", str(out)])
    assert (out / "report.png").stat().st_size > 1000
    logged = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    plotted = plot_report(load_history(out), tmp_path / "r.png")
    losses = [r for r in logged if "loss" in r]
    assert plotted["loss"] == ([r["step"] for r in losses], [r["loss"] for r in losses])
    assert plotted["eval_loss"][1] == [r["eval_loss"] for r in logged if "eval_loss" in r]
    assert plotted["tokens_per_second"][1] == [r["tokens_per_second"] for r in train]


@pytest.mark.slow
@pytest.mark.parametrize("disable_tqdm", ["false", "true"])
def test_two_node_run_prints_metrics_and_answer_once(tiny_args, tmp_path, disable_tqdm):
    """Two machines with one process each, so that every rank is its node's local rank 0: only global rank 0
    prints the metric lines, the progress bar and the sample answer; rank 1 prints warnings only, marked."""
    args = [*tiny_args, *RUN, "--max_steps", "4", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--sample_prompt", "I have a cough.", "--disable_tqdm", disable_tqdm]
    node0, node1 = launch_machines(args, tmp_path, processes=2, machines=2)
    assert node0.count("{'loss': ") == 2 and node0.count("'train_runtime': ") == 1
    assert node0.count("model answer: ") == 1 and node0.count("adapter saved to: ") == 1
    assert ("| 4/4 [" in node0) == (disable_tqdm == "false")  # the training progress bar
    for shown_on_rank_0 in ("{'", "model answer", "it/s]"):  # metrics, answer, any progress bar
        assert shown_on_rank_0 not in node1, shown_on_rank_0
    rank1 = [line for line in node1.splitlines() if line.startswith("[rank 1] ")]
    info = [line for line in rank1 if " INFO " in line]  # only the once-per-rank CPU affinity line
    assert len(info) == 1 and "rank 1 on " in info[0] and "CPU affinity" in info[0]
    assert all(" WARNING " in line or " ERROR " in line for line in rank1 if line not in info)
    assert node0.count("CPU affinity") == 1


@pytest.mark.slow
def test_resumed_job_continues_the_same_wandb_run(tiny_args, tmp_path):
    from medtune.monitoring.report import load_history

    first = [*tiny_args, *RUN, "--report_to", "wandb", "--logging_steps", "1", "--eval_strategy", "no"]
    launch([*first, "--max_steps", "3"], tmp_path, WANDB_MODE="offline")
    __import__("time").sleep(1.1)  # run folders are named by the second they start in
    launch([*first, "--max_steps", "6", "--resume", "true"], tmp_path, WANDB_MODE="offline")
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and len({d.name.split("-")[-1] for d in dirs}) == 1  # two jobs, one run id
    out = Path(tiny_args[tiny_args.index("--output_dir") + 1])
    assert (out / "checkpoint-6" / "wandb_run_id.txt").read_text() == dirs[0].name.split("-")[-1]
    assert [r["step"] for r in load_history(dirs[1]) if "loss" in r] == [4, 5, 6]  # resumed after checkpoint-3
    assert [r["step"] for r in load_history(tmp_path / "wb") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("report_to, env", [
    ("wandb", {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"}),  # unreachable, no API key
    ("none", {}),
])
def test_training_completes_without_wandb(tiny_args, tmp_path, report_to, env):
    output = launch([*tiny_args, *RUN, "--max_steps", "2", "--eval_strategy", "no", "--report_to", report_to],
                    tmp_path, **env)
    out = Path(tiny_args[tiny_args.index("--output_dir") + 1])
    assert (out / "adapter_model.safetensors").is_file()
    assert not run_dirs(tmp_path)
    assert ("W&B could not start" in output) == (report_to == "wandb")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [r["tokens_per_second"] > 0 for r in state["log_history"] if "loss" in r] == [True]

"""Training telemetry: throughput, MFU and memory metrics, one W&B run per job, quiet non-main ranks.

`configure_wandb(recipe)` runs on every rank before the Trainer is built: it settles whether W&B is used (offline
without credentials, off when wandb is missing or disabled), sets the WANDB_* environment that `wandb.init` reads,
and on resume points WANDB_RUN_ID at the run stored in the checkpoint. `monitoring_callbacks(recipe, prepared)`
returns the callbacks to pass to the Trainer: `ThroughputCallback` (adds metrics to every training log) followed by
`RunCallback` (transformers' WandbCallback, made failure-tolerant, plus run info, run-id checkpointing and the
adapter artifact). W&B is taken out of `report_to` so the Trainer does not add its own WandbCallback ahead of ours:
the throughput metrics must be in the log dict before W&B receives it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import WandbCallback

from medtune.checkpoints import checkpoints

logger = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
RUN_INFO_FILE = "run_info.json"
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets", "wandb")

# Dense (no sparsity) bf16/fp16 tensor-core peak of one device, by a substring of torch.cuda.get_device_name().
# First match wins, so the more specific names come first.
PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 only
    ("T4", 65e12),  # fp16 only
)


def peak_flops(device_name: str | None, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the `peak_tflops` override, else the PEAK_FLOPS entry for the name, else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    for key, flops in PEAK_FLOPS:
        if device_name and key.lower() in device_name.lower():
            return flops
    return None


@dataclasses.dataclass
class FlopModel:
    """Training FLOPs of LoRA on a frozen (e.g. 4-bit) base, counted as matmul FLOPs (2 per multiply-add).

    Per real token of a sample of length s:
        base weights (frozen):   forward 2*N_base + backward w.r.t. activations 2*N_base = 4*N_base
                                 (no weight gradients, so not the usual 6*N);
        LoRA weights (trained):  forward 2*N_lora + backward activations 2*N_lora + weight gradients 2*N_lora
                                 = 6*N_lora;
        attention (QK^T, AV):    forward 4*n_layers*hidden*s, backward 8*n_layers*hidden*s = 12*n_layers*hidden*s
                                 (PaLM convention: the causal mask is not halved out; s is the sample's own length,
                                 as packed samples do not attend across each other);
        gradient checkpointing:  the forward is run again: + 2*N_base + 2*N_lora + 4*n_layers*hidden*s.
    N_base counts every frozen matmul weight at its unquantized size (4-bit weights are dequantized for the matmul)
    and excludes the input embedding (a lookup, not a matmul); N_lora counts the adapter weights.
    Summed over the tokens of a batch, the attention term becomes 12*n_layers*hidden*sum(s_i^2) over its samples.
    MFU = these FLOPs / (elapsed seconds * devices * peak FLOP/s of one device).
    """

    n_base: int
    n_lora: int
    n_layers: int
    hidden: int
    recompute: bool = False

    def batch(self, tokens: float, sum_sq_lengths: float) -> float:
        """FLOPs to train on `tokens` real tokens whose samples' squared lengths sum to `sum_sq_lengths`."""
        dense, attention = 4 * self.n_base + 6 * self.n_lora, 12 * self.n_layers * self.hidden
        if self.recompute:
            dense, attention = dense + 2 * self.n_base + 2 * self.n_lora, attention + 4 * self.n_layers * self.hidden
        return dense * tokens + attention * sum_sq_lengths

    def per_token(self, seq_len: int) -> float:
        """FLOPs for one token of a sample of `seq_len` tokens."""
        return self.batch(1, seq_len)

    @classmethod
    def from_model(cls, model, recompute: bool) -> FlopModel:
        trainable = total = 0
        for param in model.parameters():
            n = param.numel() or getattr(param, "ds_numel", 0)  # ZeRO-3 leaves empty shards with ds_numel
            if param.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
                n *= 2 * param.element_size()
            total += n
            trainable += n if param.requires_grad else 0
        config = model.config
        embed = model.get_input_embeddings().weight
        tied = getattr(config, "tie_word_embeddings", False)  # then the weight is also the lm_head matmul
        embed_n = 0 if tied else embed.numel() or getattr(embed, "ds_numel", 0)
        return cls(total - trainable - embed_n, trainable, config.num_hidden_layers, config.hidden_size, recompute)


def batch_counts(input_ids: torch.Tensor, attention_mask=None, position_ids=None, pad_token_id=None) -> torch.Tensor:
    """[real tokens, samples, sum of squared sample lengths] of one model input, without a host sync.

    Real tokens are the positions covered by a sample: not padding (attention_mask 0 or the pad id). Samples start
    where position_ids restart at 0 (packed rows, padding-free batches), else one per row. sum_i s_i^2 is computed
    as sum over real tokens of (2*position + 1), since 1 + 3 + ... + (2s-1) = s^2.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        real &= attention_mask.bool()
    if pad_token_id is not None:
        real &= input_ids != pad_token_id
    if position_ids is None:
        position_ids = real.long().cumsum(-1) - 1
    starts = (position_ids == 0) & real
    squares = ((2 * position_ids + 1) * real).sum()
    return torch.stack([real.sum(), starts.sum(), squares]).double()


def memory_bytes() -> tuple[int, int]:
    """(current, peak) memory: CUDA allocated bytes when on a GPU, else this process's resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


class ThroughputCallback(TrainerCallback):
    """Adds throughput, MFU, memory, packing and ETA metrics to every training log, summed over all ranks.

    A forward pre-hook counts the real tokens and samples of each training micro-batch on the device (no sync);
    at each training log every rank contributes its counters to one gather. Time is the optimizer-step time
    (on_step_begin -> on_step_end) so evaluation and checkpoint saving do not dilute tokens/s.
    Keys (W&B shows them as train/<key>): tokens_per_second, tokens_per_second_per_device, samples_per_second,
    mfu (when the device peak is known), step_time, packing_efficiency, memory_gb, memory_peak_gb (max over
    ranks), progress (fraction of max_steps), eta_seconds.
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self._hook = None
        self._counts: torch.Tensor | None = None  # tokens, samples, sum s^2, micro-batches
        self._step_seconds = 0.0
        self._train_seconds = 0.0
        self._session_steps = 0
        self._step_started = 0.0

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from accelerate import PartialState

        dist = PartialState()
        self._device, self._world = dist.device, dist.num_processes
        pad_id = getattr(processing_class, "pad_token_id", None)
        self._slots_per_batch = args.per_device_train_batch_size * (getattr(args, "max_length", None) or 0)
        recompute = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
        try:
            self._flops = FlopModel.from_model(model, recompute=bool(recompute))
        except (AttributeError, TypeError) as err:  # a wrapper without config/embeddings: no FLOP count
            logger.warning("MFU not logged: cannot count the model's parameters (%s)", err)
            self._flops = None
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        self._peak = peak_flops(name if torch.cuda.is_available() else None, self.peak_tflops)
        if self._peak is None:
            logger.info("MFU not logged: unknown peak FLOP/s for %s (set peak_tflops to enable it)", name)
        self._start_step = state.global_step

        def count(module, args_, kwargs_):
            if not (module.training and torch.is_grad_enabled()):  # skip eval and metrics-only forwards
                return
            ids = kwargs_.get("input_ids", args_[0] if args_ else None)
            if ids is None:
                return
            counts = batch_counts(ids, kwargs_.get("attention_mask"), kwargs_.get("position_ids"), pad_id)
            slots = self._slots_per_batch or ids.numel()
            counts = torch.cat([counts, counts.new_tensor([slots])])
            self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

        self._hook = model.register_forward_pre_hook(count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._step_started
        self._step_seconds += elapsed
        self._train_seconds += elapsed
        self._session_steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only training logs carry "loss"; every rank sees the same keys, so all ranks enter the gather together.
        if logs is None or "loss" not in logs or self._hook is None:
            return
        from accelerate.utils import gather

        counts = self._counts if self._counts is not None else torch.zeros(4, dtype=torch.float64)
        current, peak = memory_bytes()
        local = torch.cat([counts.to(self._device), torch.tensor([self._step_seconds, current, peak],
                                                                  dtype=torch.float64, device=self._device)])
        rows = gather(local[None]).cpu()
        tokens, samples, squares, slots = rows[:, :4].sum(0).tolist()
        seconds, current, peak = rows[:, 4:].max(0).values.tolist()
        steps = max(state.global_step - getattr(self, "_logged_step", self._start_step), 1)
        self._logged_step, self._counts, self._step_seconds = state.global_step, None, 0.0
        metrics = {"step_time": seconds / steps, "memory_gb": current / 2**30, "memory_peak_gb": peak / 2**30}
        if seconds > 0:
            metrics.update(tokens_per_second=tokens / seconds, samples_per_second=samples / seconds,
                           tokens_per_second_per_device=tokens / seconds / self._world)
            if self._peak and self._flops:
                metrics["mfu"] = self._flops.batch(tokens, squares) / (seconds * self._world * self._peak)
        if slots:
            metrics["packing_efficiency"] = tokens / slots
        if state.max_steps > 0:
            metrics["progress"] = state.global_step / state.max_steps
            per_step = self._train_seconds / max(self._session_steps, 1)
            metrics["eta_seconds"] = (state.max_steps - state.global_step) * per_step
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # Trainer.log stored a copy of logs before the callbacks ran

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def run_info(recipe, prepared) -> dict:
    """Everything needed to reproduce or compare a run: recipe, versions, commit, hardware and data counts."""
    from accelerate import PartialState

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
        commit = git.stdout.strip() if git.returncode == 0 else None  # None outside a repo or before a commit
    except (OSError, subprocess.SubprocessError):
        commit = None
    world = PartialState().num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    stats = prepared.stats.as_dict() if prepared is not None else {}
    return {
        "recipe": {
            "path": recipe.path,
            "data": dataclasses.asdict(recipe.data),
            "model": dataclasses.asdict(recipe.model),
            "training": recipe.training.to_dict(),
            "monitoring": dataclasses.asdict(recipe.monitoring),
        },
        "versions": {"python": platform.python_version(), **versions},
        "git_commit": commit,
        "hardware": {"gpus": gpus, "gpus_per_node": len(gpus), "world_size": world,
                     "nodes": max(world // max(local, 1), 1), "host": platform.node()},
        "data": stats,
    }


class RunCallback(WandbCallback):
    """transformers' WandbCallback (init on the main process only, metrics, summary) plus:

    - a W&B failure (no credentials for an online run, unreachable server) is a warning, not a crashed job;
    - the run info (resolved recipe, versions, commit, hardware, data fingerprint and counts) goes to the run config
      and to <output_dir>/run_info.json;
    - each checkpoint records the run id in checkpoint-N/wandb_run_id.txt, which configure_wandb reads on resume;
    - at the end of a completed run the LoRA adapter is logged as a 'model' artifact; a run stopped early
      (preempted) is marked preempting instead. Either way the run is finished when training ends.
    """

    def __init__(self, recipe, prepared, use_wandb: bool):
        self._recipe, self._prepared = recipe, prepared
        self._initialized = False
        self._wandb = None
        if use_wandb:
            super().__init__()

    def setup(self, args, state, model, **kwargs):
        info = run_info(self._recipe, self._prepared) if state.is_world_process_zero else None
        if info is not None:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        if self._wandb is None:
            self._initialized = True
            return
        try:
            super().setup(args, state, model, **kwargs)
            if info is not None:
                self._wandb.config.update({"medtune": json.loads(json.dumps(info, default=str))},
                                          allow_val_change=True)
                run = self._wandb.run
                logger.info("W&B run %s, files in %s", run.id, run.dir)
        except Exception as err:  # noqa: BLE001 - any W&B failure must leave training running
            logger.warning("W&B could not start (%s: %s); training continues without W&B", type(err).__name__, err)
            self._wandb = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        if self._wandb is None or not state.is_world_process_zero or self._wandb.run is None:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / RUN_ID_FILE).write_text(self._wandb.run.id)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._wandb is None:
            return
        if state.is_world_process_zero and self._wandb.run is not None:
            if state.global_step < state.max_steps:  # stopped early (preempted): the same run resumes later
                self._wandb.run.mark_preempting()
            else:
                try:
                    super().on_train_end(args, state, control, model=model, processing_class=processing_class,
                                         **kwargs)
                    if self._recipe.monitoring.log_adapter_artifact:
                        self._log_adapter(model, processing_class)
                except Exception as err:  # noqa: BLE001 - the trained model is saved locally anyway
                    logger.warning("W&B artifact upload failed (%s); the adapter is still saved locally", err)
            self._wandb.finish()
        self._wandb = None  # later Trainer.log calls (e.g. a final evaluate) must not reach a finished run

    def _log_adapter(self, model, processing_class) -> None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # parameters are sharded; the saved checkpoint has the gathered adapter
            logger.warning("ZeRO-3: adapter artifact skipped; the adapter is in output_dir")
            return
        run = self._wandb.run
        fingerprint = getattr(getattr(self._prepared, "stats", None), "fingerprint", None)
        artifact = self._wandb.Artifact(
            f"adapter-{run.id}", type="model",
            metadata={"base_model": self._recipe.model.model_name_or_path, "data_fingerprint": fingerprint,
                      **{k: v for k, v in dict(run.summary).items() if isinstance(v, (int, float))}},
        )
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)
            artifact.add_dir(tmp)
            run.log_artifact(artifact, aliases=["latest", "final"])


class RankLogFilter(logging.Filter):
    """On ranks other than 0: drop records below WARNING and prefix the rest with [rank N]."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "rank_prefixed", False):
            record.msg, record.rank_prefixed = f"[rank {self.rank}] {record.msg}", True
        return True


def setup_rank_logging(recipe) -> None:
    """Rank 0 logs as usual; other ranks print warnings only, marked with their rank, and no progress bars."""
    import datasets
    import transformers

    rank = int(os.environ.get("RANK", "0"))
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    transformers.utils.logging.enable_default_handler()
    handlers = root.handlers + logging.getLogger("transformers").handlers
    for handler in handlers:
        if not any(isinstance(f, RankLogFilter) for f in handler.filters):
            handler.addFilter(RankLogFilter(rank))
    if rank != 0:
        recipe.training.disable_tqdm = True
        recipe.training.log_level_replica = "warning"
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) is not None
    except Exception:  # noqa: BLE001 - an unreadable netrc or a changed wandb API means: no stored login
        return False


def resume_run_id(output_dir: str) -> str | None:
    """The W&B run id stored in the newest checkpoint of output_dir that has one."""
    for checkpoint in checkpoints(output_dir):
        if (checkpoint / RUN_ID_FILE).is_file():
            return (checkpoint / RUN_ID_FILE).read_text().strip() or None
    return None


def configure_wandb(recipe, resume_checkpoint: str | os.PathLike | None = None) -> bool:
    """Decide whether this job logs to W&B (returned) and set the WANDB_* environment wandb.init reads.
    Call on every rank.

    Recipe values (wandb_project, ...) win over the environment; unset ones keep it. Without credentials and
    without WANDB_MODE the run is written offline (upload later with `wandb sync`). When wandb cannot be imported or
    is disabled, W&B is dropped with a warning. On resume the run id stored in `resume_checkpoint` (else in the
    newest checkpoint of output_dir that has one) is reused with WANDB_RESUME=allow, so a requeued job continues
    the same run.
    """
    monitoring, training = recipe.monitoring, recipe.training
    report_to = list(training.report_to or [])
    if "wandb" not in report_to:
        return False
    training.report_to = [r for r in report_to if r != "wandb"]  # RunCallback replaces the Trainer's own
    try:
        import wandb  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken wandb install must not stop training
        logger.warning("report_to includes wandb but wandb cannot be imported (%s); continuing without W&B", err)
        return False
    if os.environ.get("WANDB_MODE") == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        logger.info("W&B disabled by WANDB_MODE/WANDB_DISABLED")
        return False
    settings = {"WANDB_PROJECT": monitoring.wandb_project, "WANDB_ENTITY": monitoring.wandb_entity,
                "WANDB_RUN_GROUP": monitoring.wandb_group, "WANDB_TAGS": monitoring.wandb_tags,
                "WANDB_NAME": monitoring.wandb_name, "WANDB_DIR": monitoring.wandb_dir}
    for key, value in settings.items():
        if value:
            os.environ[key] = str(value)
    os.environ.setdefault("WANDB_PROJECT", "medtune")
    os.environ.setdefault("WANDB_DIR", training.output_dir)
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if monitoring.wandb_name and not training.run_name:
        training.run_name = monitoring.wandb_name  # WandbCallback passes run_name as the run's name
    if not os.environ.get("WANDB_MODE") and not _has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        if int(os.environ.get("RANK", "0")) == 0:
            logger.info("W&B: no API key or login found, logging offline; upload later with: wandb sync %s",
                        Path(os.environ["WANDB_DIR"]) / "wandb" / "offline-run-*")
    if recipe.data.resume and not os.environ.get("WANDB_RUN_ID"):
        stored = Path(resume_checkpoint or "") / RUN_ID_FILE
        run_id = stored.read_text().strip() if resume_checkpoint and stored.is_file() else None
        run_id = run_id or resume_run_id(training.output_dir)
        if run_id:
            os.environ["WANDB_RUN_ID"] = run_id
            os.environ.setdefault("WANDB_RESUME", "allow")
    return True


def monitoring_callbacks(recipe, prepared, use_wandb: bool) -> list[TrainerCallback]:
    """Callbacks for the Trainer, in order: metrics first, so W&B and the console see them in the same log.
    `use_wandb` is what `configure_wandb` returned."""
    setup_rank_logging(recipe)
    return [ThroughputCallback(recipe.monitoring.peak_tflops), RunCallback(recipe, prepared, use_wandb=use_wandb)]

"""One W&B run per job: settle W&B from the recipe and environment, then transformers' WandbCallback, made
failure-tolerant, with the recipe's values and the run manifest, the run id in every checkpoint, and the adapter
artifact."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from transformers.integrations import WandbCallback

from medtune.checkpoints import checkpoint_dir, checkpoints

logger = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"


class WandbRunCallback(WandbCallback):
    """The job's W&B run: transformers' WandbCallback (init on the main process only, metrics, summary) plus:

    - a W&B failure (no credentials for an online run, unreachable server) is a warning, not a crashed job;
    - the run config holds the training settings as the recipe gives them (WandbCallback logs the Trainer's, which
      medtune.training.trainer_arguments adjusted) and, under `medtune`, the run manifest (medtune.monitoring.run_info);
    - each checkpoint records the run id in checkpoint-N/wandb_run_id.txt, which configure_wandb reads on resume;
    - at the end of a completed run the LoRA adapter is logged as a 'model' artifact; a run stopped early
      (preempted) is marked preempting instead. Either way the run is finished when training ends.
    """

    def __init__(self, recipe, info: dict | None):
        """`info`: the run manifest on global rank 0, None on the other ranks."""
        super().__init__()
        self._recipe, self._info = recipe, info

    def setup(self, args, state, model, **kwargs):
        try:
            super().setup(args, state, model, **kwargs)
            if self._info is not None and self._wandb.run is not None:
                recipe_values = self._info["recipe"]["training"]
                config = {key: recipe_values[key] for key in self._info["adjusted"] if key in recipe_values}
                config["medtune"] = self._info
                self._wandb.config.update(json.loads(json.dumps(config, default=str)), allow_val_change=True)
                run = self._wandb.run
                logger.info("W&B run %s, files in %s", run.id, run.dir)
        except Exception as err:  # noqa: BLE001 - any W&B failure must leave training running
            logger.warning("W&B could not start (%s: %s); training continues without W&B", type(err).__name__, err)
            self._wandb = None

    def on_save(self, args, state, control, **kwargs):
        if self._wandb is None or not state.is_world_process_zero or self._wandb.run is None:
            return
        checkpoint = checkpoint_dir(args.output_dir, state.global_step)
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
        # Not transformers' WANDB_LOG_MODEL=end: it uploads the adapter (offline too) on one process and under DDP,
        # but saves through a second Trainer built on rank 0, which under DeepSpeed shares the engine's state and
        # fails (ZeRO-2, transformers 5.24: "'MistralForCausalLM' object has no attribute 'save_checkpoint'"), so
        # nothing is uploaded; it also logs an architecture-only artifact at start. `checkpoint` uploads every
        # checkpoint folder, optimizer state included.
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # parameters are sharded; the saved checkpoint has the gathered adapter
            logger.warning("ZeRO-3: adapter artifact skipped; the adapter is in output_dir")
            return
        run = self._wandb.run
        fingerprint = (self._info or {}).get("data", {}).get("fingerprint")
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
    """Decide whether this job logs to W&B (returned) and set the WANDB_* environment wandb.init reads; the recipe is
    only read. Call on every rank.

    Recipe values (wandb_project, ...) win over the environment; unset ones keep it. Without credentials and
    without WANDB_MODE the run is written offline (upload later with `wandb sync`). When wandb cannot be imported or
    is disabled, W&B is dropped with a warning. On resume the run id stored in `resume_checkpoint` (else in the
    newest checkpoint of output_dir that has one) is reused with WANDB_RESUME=allow, so a requeued job continues
    the same run.
    """
    monitoring, training = recipe.monitoring, recipe.training
    if "wandb" not in (training.report_to or []):
        return False
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
    if not os.environ.get("WANDB_MODE") and not _has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("W&B: no API key or login found, logging offline; upload later with: wandb sync %s",
                    Path(os.environ["WANDB_DIR"]) / "wandb" / "offline-run-*")
    if recipe.checkpointing.resume and not os.environ.get("WANDB_RUN_ID"):
        stored = Path(resume_checkpoint or "") / RUN_ID_FILE
        run_id = stored.read_text().strip() if resume_checkpoint and stored.is_file() else None
        run_id = run_id or resume_run_id(training.output_dir)
        if run_id:
            os.environ["WANDB_RUN_ID"] = run_id
            os.environ.setdefault("WANDB_RESUME", "allow")
    return True

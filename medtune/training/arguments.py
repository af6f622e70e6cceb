"""The recipe's typed settings: medtune's own dataclasses next to TRL's `ModelConfig` and `SFTConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, SFTConfig

STARLING = "berkeley-nest/Starling-LM-7B-alpha"
MEDTUNED = "nlpie/Llama2-MedTuned-Instructions"
# Every linear projection of a Mistral block, as the reference recipe targets.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DataArguments:
    """Which rows train and evaluate, and how they are cut and cached (see medtune/data/)."""

    dataset_name: str = field(
        default=MEDTUNED,
        metadata={"help": "Hub dataset id, or a local .jsonl/.json/.parquet/.csv file (the first three also "
                          ".gz/.bz2/.xz/.zst compressed) or a folder of them."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Split used for evaluation; 'none' disables it. If the dataset lacks it, "
                  "eval_split_size of the train split is held out instead."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate file/folder/hub id for evaluation (its train split is used)."}
    )
    eval_split_size: float = field(
        default=0.01, metadata={"help": "Fraction of train held out when no eval split exists (0 disables)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    overlong: str = field(
        default="truncate",
        metadata={"help": "Rows longer than max_length: 'truncate' (the input's end, then the reply's end) or "
                  "'drop' the row (both counted).",
                  "choices": ["truncate", "drop"]},
    )
    data_cache_dir: str = field(
        default=".cache/medtune/data", metadata={"help": "Where tokenized + packed datasets are cached."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template (a Jinja string, or the path of a .jinja file) in place of the tokenizer's "
                  "own; it is saved with the adapter, so chat, serving and export use it too."},
    )
    datasets: list[dict] | None = field(
        default=None,
        metadata={"help": "A mixture in place of dataset_name (TRL's `datasets:` recipe key): a list of entries "
                  "{path, name, data_files, split, columns, fraction}, each read and counted on its own; fractions on "
                  "all entries or none, no dataset oversampled (medtune/data/mixture.py). Set in the recipe file."},
    )
    eval_datasets: list[dict] | None = field(
        default=None, metadata={"help": "A mixture of eval rows, entries as in `datasets` (eval_split is then unused)."}
    )
    consultation_eval_dataset: str | None = field(
        default=None,
        metadata={"help": "A file of patient vignettes (docs/EVAL.md \"Consultation\"): at each evaluation the "
                  "model's triage safety, accuracy and emergency recall on them are logged (eval/consultation_*)."},
    )
    consultation_eval_max_new_tokens: int = field(
        default=96, metadata={"help": "Reply length of the consultation questions asked at each evaluation."}
    )
    safety_regression: str = field(
        default="warn",
        metadata={"help": "With consultation_eval_dataset: when the tuned model under-triages more emergencies than "
                  "its base by more than safety_tolerance, on any triage question, 'warn' or 'stop' (save a final "
                  "checkpoint and end the run with the reason).", "choices": ["warn", "stop"]},
    )
    safety_tolerance: int = field(
        default=0,
        metadata={"help": "Emergencies the tuned model may under-triage beyond its base before the gate acts."},
    )


@dataclass
class CheckpointArguments:
    """Resuming and time-based checkpoints, beside the Trainer's own save_strategy (see
    medtune/training/preemption.py)."""

    resume: bool = field(
        default=False, metadata={"help": "Resume from the newest complete checkpoint in output_dir, if any."}
    )
    save_every_minutes: float = field(
        default=0,
        metadata={"help": "Also save a checkpoint at the first step end once this many minutes have passed since "
                  "the last save (a crash then loses at most that much training); 0 turns it off."},
    )


@dataclass
class AfterTrainingArguments:
    """What runs once the adapter is saved: the generation eval and the sample answer."""

    generation_eval_samples: int = field(
        default=0,
        metadata={"help": "After training, generate replies to this many eval rows, spread evenly over the source "
                  "corpora (seeded), and score them per task family and source (medtune.eval); 0 turns it off."},
    )
    sample_prompt: str = field(
        default="I have had a fever, a dry cough and a sore throat for three days. What could it be?",
        metadata={"help": "Question answered by the trained model at the end of training ('' to skip)."},
    )


@dataclass
class MonitoringArguments:
    """Weights & Biases and throughput settings (see medtune/monitoring/)."""

    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project; default $WANDB_PROJECT, else 'medtune'."}
    )
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B team or user; default $WANDB_ENTITY."})
    wandb_group: str | None = field(
        default=None, metadata={"help": "W&B run group (e.g. a sweep or experiment name); default $WANDB_RUN_GROUP."}
    )
    wandb_tags: str | None = field(
        default=None, metadata={"help": "Comma-separated W&B tags, e.g. 'qlora,starling'; default $WANDB_TAGS."}
    )
    wandb_name: str | None = field(
        default=None, metadata={"help": "W&B run name; default run_name, else $WANDB_NAME, else a random name."}
    )
    wandb_dir: str | None = field(
        default=None, metadata={"help": "Folder for W&B files (offline runs land in <dir>/wandb); "
                                "default $WANDB_DIR, else output_dir."}
    )
    log_adapter_artifact: bool = field(
        default=True, metadata={"help": "Upload the trained LoRA adapter as a W&B 'model' artifact at the end."}
    )
    peak_tflops: float | None = field(
        default=None, metadata={"help": "Peak dense bf16/fp16 TFLOPS of one device, for MFU. Default: looked up "
                                "from the GPU name; MFU is not logged when unknown (e.g. on CPU)."}
    )


@dataclass
class Recipe:
    data: DataArguments
    model: ModelConfig
    training: SFTConfig
    checkpointing: CheckpointArguments
    after_training: AfterTrainingArguments
    monitoring: MonitoringArguments
    path: str | None = None


# The dataclasses a recipe's keys belong to, in the order Recipe's fields take them. A recipe is one flat YAML
# mapping: each key belongs to exactly one of them.
ARGUMENTS = (DataArguments, ModelConfig, SFTConfig, CheckpointArguments, AfterTrainingArguments, MonitoringArguments)

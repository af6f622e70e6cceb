"""launch/train.py for the Slurm tests (TRAIN_SCRIPT), with deliberate delays set in the environment:

    SLOW_END_SECONDS=S   rank 0 ends training S seconds late (as W&B's finish can), after the other ranks
    SLOW_LOAD_SECONDS=S  every rank logs "loading the model" and then takes S seconds longer to load it
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtune.training import stop_signal  # noqa: E402

stop_signal.listen()

import medtune.training.model  # noqa: E402
import medtune.training.train  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class SlowEnd(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            time.sleep(float(os.environ["SLOW_END_SECONDS"]))


def with_slow_end(build_trainer):
    def build(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(SlowEnd())
        return trainer
    return build


def with_slow_load(load_model):
    def load(recipe):
        print(f"loading the model (rank {os.environ.get('RANK')})", flush=True)
        time.sleep(float(os.environ["SLOW_LOAD_SECONDS"]))
        return load_model(recipe)
    return load


if os.environ.get("SLOW_END_SECONDS"):
    medtune.training.train.build_trainer = with_slow_end(medtune.training.train.build_trainer)
if os.environ.get("SLOW_LOAD_SECONDS"):
    medtune.training.model.load_model = with_slow_load(medtune.training.model.load_model)

if __name__ == "__main__":
    medtune.training.train.main()

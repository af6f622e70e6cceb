"""The Trainer's arguments: the recipe's, adjusted in one place, each adjustment logged and recorded; the recipe
itself and the run manifest keep the user's values."""

from __future__ import annotations

import json
import logging

from conftest import TINY_RECIPE
from medtune.training.config import parse_recipe
from medtune.monitoring import run_info
from medtune.training.trainer_arguments import resolve_trainer_arguments


def _recipe(tiny_model_dir, tmp_path, *overrides, **replace):
    return parse_recipe(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_model_dir),
                         "--output_dir", str(tmp_path / "out"), *overrides], replace=replace)


def test_adjustments_are_made_on_a_copy_logged_and_recorded(tiny_model_dir, tmp_path, caplog):
    recipe = _recipe(tiny_model_dir, tmp_path, "--save_total_limit", "2", "--wandb_name", "qlora-1",
                     "--eval_strategy", "steps", report_to=["wandb", "tensorboard"])
    user = recipe.training.to_dict()
    with caplog.at_level(logging.INFO, logger="medtune"):
        args, adjustments = resolve_trainer_arguments(recipe, has_eval=False)

    assert args is not recipe.training and recipe.training.to_dict() == user  # the recipe is left as written
    assert args.save_total_limit is None  # medtune.training.preemption rotates checkpoints once the new one is complete
    assert args.report_to == ["tensorboard"] and args.run_name == "qlora-1"  # medtune's W&B callback instead
    assert args.eval_strategy == "no"  # no eval rows
    assert args.padding_free is True and args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert args.log_on_each_node is False
    changed = {a.key: (a.recipe, a.used) for a in adjustments}
    assert changed["save_total_limit"] == (2, None)
    assert changed["report_to"] == (["wandb", "tensorboard"], ["tensorboard"])
    assert changed["eval_strategy"] == ("steps", "no")
    assert "training argument save_total_limit: 2 -> None (medtune rotates checkpoints" in caplog.text
    assert len([r for r in caplog.records if r.getMessage().startswith("training argument ")]) == len(adjustments)

    info = json.loads(json.dumps(run_info(recipe, None, adjustments), default=str))
    assert info["recipe"]["training"]["save_total_limit"] == 2 and info["recipe"]["training"]["report_to"] == [
        "wandb", "tensorboard"]
    assert info["adjusted"]["save_total_limit"]["recipe"] == 2 and info["adjusted"]["save_total_limit"]["used"] is None
    assert info["adjusted"]["eval_strategy"] == {"recipe": "steps", "used": "no", "reason": "no eval rows"}


def test_nothing_to_adjust_is_not_reported(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path, "--report_to", "none", "--packing", "false")
    _, adjustments = resolve_trainer_arguments(recipe, has_eval=True)
    # medtune always sets these two; nothing else differs from this recipe on one CPU process.
    assert {a.key for a in adjustments} == {"log_on_each_node", "dataset_kwargs"}

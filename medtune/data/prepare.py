"""Tokenize + pack a recipe's data into the cache and exit: run once before a multi-node launch.

    python -m medtune.data.prepare --config configs/recipes/starling_medtuned.yaml
"""

from __future__ import annotations

from medtune.config import recipe_from_command_line


def main(argv: list[str] | None = None) -> None:
    recipe = recipe_from_command_line(argv)
    from medtune.model import load_tokenizer
    from medtune.data import prepare_dataset
    from medtune.monitoring import setup_logging

    setup_logging(recipe.training)

    prepared = prepare_dataset(recipe, load_tokenizer(recipe))
    print(prepared.stats.summary("train"))
    if prepared.eval_stats:
        print(prepared.eval_stats.summary("eval"))
    print(f"cache: {prepared.cache_dir}")


if __name__ == "__main__":
    main()

"""Tokenize + pack a recipe's data into the cache and exit: run once before a multi-node launch.

    python -m medtune.data.prepare --config configs/recipes/starling_medtuned.yaml
"""

from __future__ import annotations

import logging
import sys

from medtune.config import ConfigError, parse_recipe


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = parse_recipe(argv)
    except ConfigError as err:
        sys.exit(f"medtune: {err}")
    from medtune.model import load_tokenizer
    from medtune.data import prepare_dataset

    prepared = prepare_dataset(recipe, load_tokenizer(recipe))
    print(prepared.stats.summary("train"))
    if prepared.eval_stats:
        print(prepared.eval_stats.summary("eval"))
    print(f"cache: {prepared.cache_dir}")


if __name__ == "__main__":
    main()

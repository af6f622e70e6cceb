"""Tokenize + pack a recipe's data into the cache and exit: run once before a multi-node launch.

    python -m medtune.prepare_data --config configs/recipes/starling_medtuned.yaml
    medtune-prepare-data --config R --show 3 --json    # the first 3 prepared training rows, unpacked, as JSON lines

`--show N` prints the first N training rows as they are trained on, in file order and before packing: one JSON
object per line, {"source": str|null, "messages": [{"role", "content"}, ...], "input_ids": [int], "labels": [int]}
with labels -100 where a token is not trained on. Without --json the same rows are printed with the supervised spans
marked (as the preflight shows them).
"""

from __future__ import annotations

import json
import sys

from medtune.training.config import recipe_from_command_line


def _pop_show(argv: list[str]) -> tuple[int | None, bool, list[str]]:
    """(--show N, --json, the rest for the recipe parser)."""
    rest, show, as_json, i = [], None, False, 0
    while i < len(argv):
        if argv[i] == "--json":
            as_json = True
        elif argv[i] == "--show" or argv[i].startswith("--show="):
            value = argv[i].partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in argv[i] else 1
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"medtune: --show takes a number of rows (1 or more), got {value!r}")
            show = int(value)
        else:
            rest.append(argv[i])
        i += 1
    return show, as_json, rest


def show_rows(recipe, fmt, n: int):
    """The first n prepared training rows: (row, input_ids, labels)."""
    from medtune.data.fingerprint import completion_only
    from medtune.data.pipeline import DataStats, encode_rows
    from medtune.data.splits import read_splits

    rows, report, _, _ = read_splits(recipe)
    out = []
    for row, ids, labels, _ in encode_rows(rows, fmt, recipe.training.max_length, recipe.data.overlong,
                                           completion_only(recipe), DataStats(), report):
        out.append((row, ids, labels))
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    show, as_json, rest = _pop_show(list(sys.argv[1:] if argv is None else argv))
    recipe = recipe_from_command_line(rest, description=__doc__)
    from medtune.data import prepare_dataset
    from medtune.data.preflight import marked_text
    from medtune.training.model import load_chat_format
    from medtune.monitoring import setup_logging

    setup_logging(recipe.training)
    fmt = load_chat_format(recipe)
    if show is not None:
        for row, ids, labels in show_rows(recipe, fmt, show):
            if as_json:
                print(json.dumps({"source": row.get("source"), "messages": row["messages"], "input_ids": ids,
                                  "labels": labels}, ensure_ascii=False))
            else:
                print(f"{row['where']} ({sum(label != -100 for label in labels)} of {len(ids)} tokens supervised)\n"
                      f"{marked_text(fmt.tokenizer, ids, labels)}\n")
        return
    prepared = prepare_dataset(recipe, fmt)
    print(prepared.stats.summary("train"))
    if prepared.eval_stats:
        print(prepared.eval_stats.summary("eval"))
    print(f"cache: {prepared.cache_dir}")


if __name__ == "__main__":
    main()

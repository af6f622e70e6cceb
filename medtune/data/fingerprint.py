"""The data cache's key: what the tokenized, packed data depends on, hashed.

Local files count by content, not by size and modification time (a copy or a touch must not rebuild, an edit
that keeps the size must). Content is hashed with xxHash's XXH3-128 (the xxhash package, which `datasets` already
depends on): 200 MiB in 0.03-0.04 s here against 0.45-0.48 s for hashlib's BLAKE2b, i.e. about a twentieth of
a cache hit's start-up instead of several times it. A hub dataset counts by its builder's own fingerprint.
"""

from __future__ import annotations

import hashlib
import json

from medtune.data.rows import is_local, local_files
from medtune.inference.gguf import file_digest

PIPELINE_VERSION = 6  # bump when the encoding, packing or splitting changes meaning


def source_fingerprint(source: str, config: str | None) -> str:
    if is_local(source):
        return json.dumps([(p.name, file_digest(p)) for p in local_files(source)])
    import datasets

    builder = datasets.load_dataset_builder(source, config)
    return f"{source}|{config}|{builder.hash}"


def mixture_fingerprint(entries: list[dict], key: str = "datasets", model: list | None = None) -> list:
    """Every entry's content and settings (fraction, columns, split, ...): changing any one rebuilds; replies of
    a replay or self-distillation also depend on the base `model` (its path and revision)."""
    from dataclasses import astuple

    from medtune.data import mixture

    return [[astuple(e), [source_fingerprint(s, e.name) for s in e.sources()],
             model if e.replay or e.self_distill is not None else None] for e in mixture.parse(entries, key)]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    # Truncation/padding state changes with every call that sets them; it does not change the ids we store.
    spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def completion_only(recipe) -> bool:
    return recipe.training.completion_only_loss is not False  # TRL's default (None) means completion-only


def fingerprint(recipe, fmt) -> str:
    d, t = recipe.data, recipe.training
    parts = {
        "version": PIPELINE_VERSION,
        "train": mixture_fingerprint(d.datasets, model=[recipe.model.model_name_or_path, recipe.model.model_revision])
        if d.datasets else source_fingerprint(d.dataset_name, d.dataset_config),
        "eval": mixture_fingerprint(d.eval_datasets, "eval_datasets") if d.eval_datasets else
        source_fingerprint(d.eval_dataset_name, None) if d.eval_dataset_name else None,
        "splits": [d.train_split, d.eval_split, d.eval_split_size, d.max_train_samples, d.max_eval_samples, t.seed],
        "tokenizer": tokenizer_fingerprint(fmt.tokenizer),
        "template": [fmt.template, list(fmt.stop_ids)],
        "options": [t.max_length, d.overlong, completion_only(recipe), t.packing],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

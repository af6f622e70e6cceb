"""Console logging of a training process, set up once by the entry point (alignment-handbook's pattern)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(args) -> None:
    """Global rank 0 logs at INFO and shows the progress bar and the Trainer's metric lines; every other rank logs
    warnings and errors only (`log_level_replica`), each line prefixed with [rank N], and no progress bars.

    `args` (TrainingArguments) is set to `log_on_each_node=False`, so transformers' `should_log` and
    `get_process_log_level` single out global rank 0 rather than each node's local rank 0. transformers' and
    datasets' records go through the root handler, so they carry the rank prefix too.
    """
    import datasets
    import transformers

    args.log_on_each_node = False
    main = args.should_log
    library_level = args.get_process_log_level()  # rank 0: log_level (passive: the libraries' own); else replica
    prefix = "" if main else f"[rank {args.process_index}] "
    logging.basicConfig(format=prefix + FORMAT, datefmt="%H:%M:%S", level=logging.INFO if main else library_level)
    logging.captureWarnings(True)
    for library in (transformers.utils.logging, datasets.utils.logging):
        library.set_verbosity(library_level)
        library.enable_propagation()
    transformers.utils.logging.disable_default_handler()
    logging.getLogger("datasets").handlers.clear()  # its own handler besides propagation would print twice
    if not main:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        # With disable_tqdm the Trainer prints metrics through PrinterCallback, which prints on every node's local
        # rank 0 (measured: a 2-node run printed each metric line twice); ProgressCallback shows nothing off rank 0.
        args.disable_tqdm = False

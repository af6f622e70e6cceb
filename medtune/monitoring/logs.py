"""Console logging of a training process, set up once by the entry point (alignment-handbook's pattern)."""

from __future__ import annotations

import copy
import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Info that every rank prints once (e.g. its CPU affinity), where other ranks print warnings and errors only.
EVERY_RANK = "medtune.every_rank"


def setup_logging(args) -> None:
    """Global rank 0 logs at INFO and shows the progress bar and the Trainer's metric lines; every other rank logs
    warnings and errors only (`log_level_replica`), each line prefixed with [rank N], and no progress bars. Records
    of the EVERY_RANK logger are printed on every rank.

    "Main" is global rank 0, as transformers' `should_log` and `get_process_log_level` decide with
    `log_on_each_node=False` (the Trainer gets that setting from medtune.training.trainer_arguments); `args`
    (TrainingArguments) is read, not changed. transformers' and datasets' records go through the root handler, so
    they carry the rank prefix too.
    """
    import datasets
    import transformers

    rank = args.process_index  # sets up the distributed state once, before the copy shares it
    global_rank_0 = copy.copy(args)
    global_rank_0.log_on_each_node = False
    main = global_rank_0.should_log
    library_level = global_rank_0.get_process_log_level()  # rank 0: log_level (passive: the libraries'); else replica
    prefix = "" if main else f"[rank {rank}] "
    logging.basicConfig(format=prefix + FORMAT, datefmt="%H:%M:%S", level=logging.INFO if main else library_level)
    logging.getLogger(EVERY_RANK).setLevel(logging.INFO)
    logging.captureWarnings(True)
    for library in (transformers.utils.logging, datasets.utils.logging):
        library.set_verbosity(library_level)
        library.enable_propagation()
    transformers.utils.logging.disable_default_handler()
    logging.getLogger("datasets").handlers.clear()  # its own handler besides propagation would print twice
    if not main:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

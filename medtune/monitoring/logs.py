"""Console logging per rank: rank 0 as usual, other ranks warnings only, marked with their rank."""

from __future__ import annotations

import logging
import os


class RankLogFilter(logging.Filter):
    """On ranks other than 0: drop records below WARNING and prefix the rest with [rank N]."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "rank_prefixed", False):
            record.msg, record.rank_prefixed = f"[rank {self.rank}] {record.msg}", True
        return True


def setup_rank_logging(recipe) -> None:
    """Rank 0 logs as usual; other ranks print warnings only, marked with their rank, and no progress bars."""
    import datasets
    import transformers

    rank = int(os.environ.get("RANK", "0"))
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    transformers.utils.logging.enable_default_handler()
    handlers = root.handlers + logging.getLogger("transformers").handlers
    for handler in handlers:
        if not any(isinstance(f, RankLogFilter) for f in handler.filters):
            handler.addFilter(RankLogFilter(rank))
    if rank != 0:
        recipe.training.disable_tqdm = True
        recipe.training.log_level_replica = "warning"
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

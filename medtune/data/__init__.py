"""MedTuned data: reading rows, the chat-format encoding with a loss mask, BFD packing and the on-disk cache."""

from medtune.data.pipeline import DataStats, PreparedData, prepare_dataset
from medtune.data.rows import read_rows

__all__ = ["DataStats", "PreparedData", "prepare_dataset", "read_rows"]

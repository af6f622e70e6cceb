"""medtune: QLoRA fine-tuning of Starling-LM-7B-alpha into a medical assistant, and serving it."""

__version__ = "0.1.0"

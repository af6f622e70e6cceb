"""Training: the entry point, the recipe, the 4-bit base, the Trainer's arguments, preemption and node launch."""

"""Held-out MedTuned evaluation: task-family detection, per-family scorers, base-vs-tuned reports."""

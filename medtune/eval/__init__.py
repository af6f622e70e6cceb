"""Held-out MedTuned evaluation: source and family of a row, the scorers, generated or given replies, the report."""

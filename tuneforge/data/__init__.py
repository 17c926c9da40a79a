"""Data: files to token batches (domain text, instructions, completions, classification)."""

"""The bottom layer, torch-free: errors, atomic writes and the typed configuration."""

"""Reading and writing: models, adapters, exports, and the atomic file writes they share."""

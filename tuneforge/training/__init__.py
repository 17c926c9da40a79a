"""The one training loop, its optimizer and schedules, and distributed set-up."""

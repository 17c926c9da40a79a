"""Evaluation: language-model loss, classification by label scoring, few-shot prompts, generation."""

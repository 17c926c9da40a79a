"""Weight quantization for memory-light fine-tuning (NF4, as in QLoRA), in plain PyTorch."""

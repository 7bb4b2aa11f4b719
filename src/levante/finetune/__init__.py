"""Fine-tuning: chat JSONL to masked batches, data mixing, LoRA/QLoRA through peft."""

"""Training: dataset checks, QLoRA SFT/DPO and evaluation (see docs/architecture.md)."""

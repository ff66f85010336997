"""Self-Paced GRPO post-training of text-to-video generators with PyTorch Lightning."""

__version__ = "0.1.0"

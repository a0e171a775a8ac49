"""dust: semi-supervised medical image segmentation (DUST and its baselines on one engine)."""

__version__ = "0.1.0"

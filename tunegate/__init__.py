"""tunegate: raw conversations to a shipped, fine-tuned language model, gated on being better."""

__version__ = "0.1.0"

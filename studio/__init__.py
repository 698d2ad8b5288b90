"""LoRA Studio engine: never imports gradio."""

__version__ = "0.1.0"

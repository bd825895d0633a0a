"""Visual-token reduction (Simignore and peers) for LLaVA-style models, as an lmms-eval plugin."""

__version__ = "0.1.0"

"""One adapter per model family over transformers' own modules: how a processed batch becomes the LLM's input
(image tokens, positions). The LLaVA-1.5 / Mipha path is still in `lmms_simignore.engine.prompt`."""

"""The speed benchmark (`speed`), its ScienceQA-IMG-sized pass, the prefill FLOP model and random-weight LLaVA-1.5 shapes."""

"""4-bit loading as the published Simignore runs did it (LLaVA's `load_4bit`: nf4, double quantization, fp16 compute)."""

from __future__ import annotations

import torch


def nf4_quantization_config(device: torch.device):
    """BitsAndBytesConfig for nf4 weights in the language model and projector; the vision tower stays unquantized.

    Raises a ValueError naming `quantization=nf4` when there is no CUDA device or no bitsandbytes.
    """
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"quantization=nf4 loads 4-bit weights with bitsandbytes, which needs a CUDA GPU; the device is {device}. "
            "Use quantization=none (with a preset, add it to override the preset's 4-bit loading)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError("quantization=nf4 needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=[r".*vision_tower", "lm_head"],  # patterns match module paths from the start
    )

"""The one place where a token selection is applied to a LLaVA model, and where generation runs.

A prompt travels like this:
  input_ids (B, L) + pixel_values  ->  `build_prompt_embeddings`: image features (after the projector)
  scattered into the token embeddings at the image-token positions found from `input_ids`
  ->  `reduce_prompt`: a stage before the LLM picks the image tokens to keep, per image; the others are
  either masked (`apply="mask"`, attention mask 0, sequence unchanged) or dropped (`apply="drop"`,
  removed from the sequence) -- in both cases every kept token keeps its *original* position id.
  A vision-side stage instead shortens each image inside the tower, before the projector; the shorter
  image sits where the image was, at contiguous positions (`embed_prompt`).
  ->  `LanguageModelRun` (used by `generate` and `continuation_logprobs`): our loop over the decoder
  layers. An in-LLM stage at layer K chooses, from what layers < K computed, among the image tokens still
  present and drops the rest for layers >= K. The reduced prompt is
  what sits in the KV cache, so ignored and pruned tokens stay invisible for the whole generation, not
  just the prefill. The image tokens each layer saw are counted there too. It runs the language model
  families in `families.py` (Llama, Phi) and refuses the others by name.
"""


from lmms_simignore.engine.accounting import TokenAccounting, layer_runs
from lmms_simignore.engine.attention import last_token_attention, layer_key_norms, vision_layer_attention
from lmms_simignore.engine.decoder import DecodingOptions, Generation, ImageTokensSeen, LanguageModelRun, _next_tokens, continuation_logprobs, generate
from lmms_simignore.engine.families import DECODER_FAMILIES, check_model_support, check_plan_support, final_norm
from lmms_simignore.engine.prompt import (PromptEmbeddings, ReducedPrompt, build_prompt_embeddings, default_position_ids,
                                          embed_texts, image_grid, image_tokens_per_image, reduce_prompt, with_image_blocks,
                                          with_shorter_images)
from lmms_simignore.engine.stages import (apply_image_plans_before_llm, apply_vision_stages_to_views, apply_pre_llm_stage, choose_kept_image_tokens, embed_prompt,
                                          every_image_token, image_plans, plan_for, prepare_reduced_prompt, reduce_each_image, vision_stage_features,
                                          vision_stage_images, vision_tower_states)

__all__ = [
    "DECODER_FAMILIES", "DecodingOptions", "Generation", "ImageTokensSeen", "LanguageModelRun", "PromptEmbeddings", "ReducedPrompt",
    "TokenAccounting", "apply_image_plans_before_llm", "apply_vision_stages_to_views", "apply_pre_llm_stage", "build_prompt_embeddings", "check_model_support", "check_plan_support",
    "choose_kept_image_tokens", "continuation_logprobs", "default_position_ids", "embed_prompt", "embed_texts", "every_image_token", "final_norm", "generate", "image_grid", "image_plans",
    "image_tokens_per_image", "last_token_attention", "layer_key_norms", "layer_runs", "plan_for", "prepare_reduced_prompt", "reduce_each_image", "reduce_prompt",
    "vision_layer_attention", "vision_stage_features", "vision_stage_images", "vision_tower_states", "with_image_blocks", "with_shorter_images",
]

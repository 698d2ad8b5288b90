"""Architecture configs: real SDXL base 1.0 and the embedded tiny SDXL.

The tiny model keeps SDXL's block structure (three levels, the same block types,
two resnets per level, `text_time` added conditioning, two text encoders whose
hidden states are concatenated for cross-attention) so every module name it has
is also a module name of the real SDXL UNet/TEs, and LoRA keys map the same way.
Only widths, depths of the transformer stacks, and text-encoder layer counts shrink.
"""

from __future__ import annotations

from typing import Any

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SDXL_TE1: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

SDXL_TE2: dict[str, Any] = {
    **SDXL_TE1,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# Tiny: GroupNorm(8), not SDXL's 32: with 32 groups on 32 channels every channel is
# normalised alone, which erases a flat region's colour (the demo model's whole subject:
# its VAE reconstructed every background as the same two colours until this changed).
# The real CLIP vocabulary (49,408), so the shipped tokenizer works unchanged.
TINY_TE1: dict[str, Any] = {**SDXL_TE1, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "projection_dim": 32}
TINY_TE2: dict[str, Any] = {**SDXL_TE2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "projection_dim": 32}

TINY_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "sample_size": 16,  # latent side: 128 px through the 8x VAE
    "block_out_channels": [32, 64, 64],
    "norm_num_groups": 8,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": TINY_TE1["hidden_size"] + TINY_TE2["hidden_size"],
    "addition_time_embed_dim": 8,
    # 6 micro-conditioning numbers x time-embed dim + TE2's pooled projection
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_TE2["projection_dim"],
}

TINY_VAE: dict[str, Any] = {**SDXL_VAE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
                            "norm_num_groups": 8, "sample_size": 128}

TINY_DEFAULT_SIZE = 128  # what the demo model was trained at (scripts/train_demo_model.py)
SDXL_DEFAULT_SIZE = 1024

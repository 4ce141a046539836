"""Floating-point operations of one training iteration, for TFLOP/s and MFU.

Counted as 2 FLOPs per multiply-add of every matrix product (activations x weights, and the attention
score and value products over the full s x s matrix, as Megatron-LM counts them, even though causal
kernels skip the upper half). Norms, softmax, activations and the loss are left out.

Per micro-batch with b samples of s decoder positions and n images:

* decoder layer: 2bs·h·(h + 2·g·d) [QKV] + 2bs·h² [output projection] + 4bs²·h [scores and values]
  + 3·2bs·h·f [SwiGLU: gate, up, down]; plus 2bs·h·V for the output layer;
* CLIP layer (per image, t = patches + 1 tokens): 2t·hv·3hv + 2t·hv² + 4t²·hv + 2·2t·hv·fv;
  plus the patch embedding 2·patches·3p²·hv;
* projector (per image, N feature positions): 2N·(hv·fp + fp·h) for mlp2x_gelu, 2N·hv·h for linear.

Training multiplies each part's forward FLOPs by what its backward does:
* a trainable part: 3 (forward, activation gradients, weight gradients);
* a frozen part that gradients must pass through (a frozen decoder under a trainable projector): 2
  (forward and activation gradients — its weight gradients are never computed);
* a frozen part nothing upstream of which trains (the frozen vision tower, run under no_grad): 1.
"""

from __future__ import annotations

from mm_plugin.config.model import LlavaConfig

# Dense bf16/fp16 tensor-core peak of one device, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "Ascend910B": 313.0}


def decoder_forward_flops(config: LlavaConfig, batch: int, positions: int) -> float:
    lm = config.language
    h, f, v = lm.hidden_size, lm.ffn_hidden_size, lm.vocab_size
    d = lm.kv_channels or h // lm.num_attention_heads
    g = lm.num_query_groups or lm.num_attention_heads
    bs = batch * positions
    layer = 2 * bs * h * (lm.num_attention_heads * d + 2 * g * d) + 2 * bs * lm.num_attention_heads * d * h \
        + 4 * batch * positions ** 2 * lm.num_attention_heads * d + 3 * 2 * bs * h * f
    return lm.num_layers * layer + 2 * bs * h * v


def vision_forward_flops(config: LlavaConfig, images: int) -> float:
    vision = config.vision
    hv, fv, t = vision.hidden_size, vision.ffn_hidden_size, vision.num_patches + vision.class_token_len
    layer = 2 * t * hv * 3 * hv + 2 * t * hv * hv + 4 * t * t * hv + 2 * 2 * t * hv * fv
    patch_embedding = 2 * vision.num_patches * 3 * vision.patch_size ** 2 * hv
    return images * (vision.num_layers_built * layer + patch_embedding)


def projector_forward_flops(config: LlavaConfig, images: int) -> float:
    hv, h = config.vision.hidden_size, config.language.hidden_size
    n = config.vision.num_image_tokens
    kind = config.projector.projector_type
    if kind == "identity":
        return 0.0
    if kind == "linear":
        return images * 2 * n * hv * h
    fp = config.projector.ffn_hidden_size or h
    return images * 2 * n * (hv * fp + fp * h)


def training_flops(config: LlavaConfig, *, samples: int, positions: int, images: int) -> float:
    """FLOPs of training on ``samples`` sequences of ``positions`` decoder positions with ``images``
    images (for a whole iteration: its global batch)."""
    vision_trains = not config.vision.freeze
    projector_trains = not config.projector.freeze
    language_trains = not config.language.freeze

    def factor(trains: bool, gradients_pass_through: bool) -> int:
        return 3 if trains else 2 if gradients_pass_through else 1

    return (
        factor(vision_trains, False) * vision_forward_flops(config, images)
        + factor(projector_trains, vision_trains) * projector_forward_flops(config, images)
        + factor(language_trains, vision_trains or projector_trains)
        * decoder_forward_flops(config, samples, positions // max(samples, 1))
    )


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """Peak of this device: ``--peak-tflops`` when given, else a known GPU's dense bf16 peak."""
    if override:
        return override
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return peak
    return None

"""Tiny megatron-core models and batches for tests that run inside the 2-process pool.

Sizes are chosen to exercise the awkward cases: grouped-query attention (4 heads, 2 groups), an FFN
width that is not a power of two, and a vocabulary (101) that no TP size divides, so the vocabulary
tables carry padding rows (padded to 104, as megatron pads to a multiple of the TP size).
"""

from __future__ import annotations

import torch

from seeds import varied

VOCAB = 101
PADDED_VOCAB = 104
SEQUENCE = 8
MICRO_BATCH = 2


def gpt_config(num_layers: int = 4, **overrides):
    """A LLaMA-style config (RMSNorm, SwiGLU, RoPE, no biases) for the current TP/PP sizes."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    settings = dict(
        num_layers=num_layers, hidden_size=48, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=88,
        normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, bias_activation_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    return TransformerConfig(**{**settings, **overrides})


def gpt(config=None, vocab_size: int = PADDED_VOCAB, **overrides):
    """A GPTModel (local spec) for this rank's pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(
        config=config or gpt_config(), transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab_size, max_sequence_length=SEQUENCE, position_embedding_type="rope",
        share_embeddings_and_output_weights=False, pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(), **overrides,
    )
    model.model_type = ModelType.encoder_or_decoder  # normally set by megatron.training
    return model


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation (megatron-core 0.12 has none of its own)."""
    return x * torch.sigmoid(1.702 * x)


def clip_config(**overrides):
    """A CLIP-ViT-style config: LayerNorm, quick_gelu, biases everywhere, no pipeline split."""
    from megatron.core.transformer import TransformerConfig

    settings = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, normalization="LayerNorm",
        layernorm_epsilon=1e-5, add_bias_linear=True, add_qkv_bias=True, activation_func=quick_gelu,
        bias_activation_fusion=False, gated_linear_unit=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**settings, **overrides})


def clip_layer_spec():
    """megatron's local layer spec without a causal mask (CLIP attends both ways). (0.12's ViT spec
    module imports TransformerEngine, so the GPT one is used: the same modules.)"""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = get_gpt_layer_local_spec(normalization="LayerNorm")
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def clip_block(config=None):
    from megatron.core.transformer.transformer_block import TransformerBlock

    return TransformerBlock(config or clip_config(), clip_layer_spec(), post_layer_norm=False)


def batches(seed: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` micro-batches of (tokens, next-token labels), the same on every rank."""
    generator = torch.Generator().manual_seed(varied(seed))
    tokens = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQUENCE + 1), generator=generator) for _ in range(count)]
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def run_schedule(model, micro_batches, forward_only: bool = False) -> list[float]:
    """Forward (and backward) through megatron's schedule; per-micro-batch mean losses on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        tokens, labels = next(data_iterator)
        per_token = model_chunk(tokens, None, None, labels=labels)
        return per_token, lambda output: (output.float().mean(), {"loss": output.float().mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=SEQUENCE, micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
    )
    return [float(entry["loss"]) for entry in losses]


def ddp_and_optimizer(config, model, distributed_optimizer: bool = False, lr: float = 1e-2):
    """megatron's DDP wrapper and Adam for ``model``, wired into ``config`` as a training loop does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, \
        finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp, optimizer


def random_full_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A full (TP=1, PP=1) GPT state dict with random values and the true vocabulary's rows.

    Builds the reference model, so it resets megatron's process groups to TP=1, PP=1."""
    from process_pool import parallel

    parallel(1, 1, seed=seed)
    reference = gpt(gpt_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=1))
    generator = torch.Generator().manual_seed(varied(seed))
    full = {}
    for key, value in reference.state_dict().items():
        if isinstance(value, torch.Tensor):
            value = value + 0.1 * torch.randn(value.shape, generator=generator)  # norms too: no all-ones
            full[key] = value[:VOCAB].clone() if value.shape[0] == PADDED_VOCAB else value
    return full

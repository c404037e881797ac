"""Llama-style decoder with a pluggable trunk, KV-cache generation and HF Llama interop."""

from vlm_transformer.__about__ import __version__
from vlm_transformer.attention import Attention, attention, repeat_kv
from vlm_transformer.block import DecoderBlock
from vlm_transformer.cache import (
    KVCache,
    LayerKVCache,
    StaticKVCache,
    StaticLayerKVCache,
    StepPositions,
)
from vlm_transformer.context import ModalityContext
from vlm_transformer.generate import DecodeContextFn, generate, sample_next_token
from vlm_transformer.init import init_module_tree, mark_output_projection, mark_zero_init
from vlm_transformer.loss import linear_cross_entropy
from vlm_transformer.masks import AttentionMask, build_attention_mask
from vlm_transformer.mlp import GeluMLP, SwiGLU, build_mlp
from vlm_transformer.model import Transformer, segment_positions
from vlm_transformer.norms import LayerNorm, RMSNorm, build_norm
from vlm_transformer.rotary import RotaryEmbedding, apply_rotary, rotary_inv_freq, rotate_half
from vlm_transformer.trunk import DenseTrunk, Trunk, TrunkInputs

__all__ = [
    "Attention",
    "AttentionMask",
    "DecodeContextFn",
    "DecoderBlock",
    "DenseTrunk",
    "GeluMLP",
    "KVCache",
    "LayerKVCache",
    "LayerNorm",
    "ModalityContext",
    "RMSNorm",
    "RotaryEmbedding",
    "StaticKVCache",
    "StaticLayerKVCache",
    "StepPositions",
    "SwiGLU",
    "Transformer",
    "Trunk",
    "TrunkInputs",
    "__version__",
    "apply_rotary",
    "attention",
    "build_attention_mask",
    "build_mlp",
    "build_norm",
    "generate",
    "init_module_tree",
    "linear_cross_entropy",
    "mark_output_projection",
    "mark_zero_init",
    "repeat_kv",
    "rotary_inv_freq",
    "rotate_half",
    "sample_next_token",
    "segment_positions",
]

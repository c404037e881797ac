"""The Llama-style decoder config (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlm_config.components import StrictModel


class ModelConfig(StrictModel):
    """Decoder hyper-parameters.

    ``ffn_hidden_dim`` wins when set; otherwise the SwiGLU width follows Llama:
    ``int(2 * 4 * dim / 3 * ffn_dim_multiplier)`` rounded up to ``multiple_of``
    (a plain GELU MLP uses ``4 * dim * ffn_dim_multiplier``, rounded the same way).
    """

    dim: int = Field(default=256, ge=1)
    n_layers: int = Field(default=4, ge=1)
    n_heads: int = Field(default=8, ge=1)
    n_kv_heads: int | None = Field(default=None, ge=1, description="None means n_heads (MHA)")
    vocab_size: int = Field(default=4096, ge=2)
    ffn_hidden_dim: int | None = Field(default=None, ge=1)
    ffn_dim_multiplier: float = Field(default=1.0, gt=0)
    multiple_of: int = Field(default=32, ge=1)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(default=1e-5, gt=0)
    max_seq_len: int = Field(default=512, ge=1)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_embeddings: bool = False
    qk_norm: bool = False
    init_std: float = Field(default=0.02, gt=0)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Resolved FFN hidden width."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        base = 8 * self.dim / 3 if self.mlp == "swiglu" else 4 * self.dim
        hidden = int(base * self.ffn_dim_multiplier)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings"
            )
        return self

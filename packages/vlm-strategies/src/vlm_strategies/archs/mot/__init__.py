"""``mot``: Mixture-of-Transformers (Liang et al. 2024): per-modality Q/K/V/O, norms and
FFNs in every layer, one global causal attention over image prefix + text."""

"""``moma``: Mixture of Modality-aware experts (MoMa, Lin et al. 2024).

Image prefix + shared (dense) self-attention; every layer's FFN is replaced by one
group of expert-choice, sigmoid-routed SwiGLU experts per modality (image, text).

Expert-choice routing is **non-causal**: each expert picks its top-k tokens among all
positions of a sequence, so a later token can change which earlier tokens an expert
takes and hence an earlier position's output.  This holds in training too, so
teacher-forced accuracy overstates MoMa; evaluate by generation.  The arch sets
``incremental_decoding = False``: :meth:`VLMWrapper.generate` recomputes the whole
sequence at every step, which is exactly the training-time forward.
"""

"""``cross_attention``: text attends to image K/V in blocks inserted every N decoder blocks
(Flamingo / Llama 3.2 Vision style); the residual stream holds text only."""

"""The paper's model: attention (reference attention, masks, KV cache, multi-head), positional
encodings, layers and the Transformer (transformer.py)."""

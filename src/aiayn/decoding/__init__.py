"""Decoding: one search loop with strategies (search.py), word alignment, and the Translator
(text in, text out)."""

"""Tokenizers and data pipelines."""

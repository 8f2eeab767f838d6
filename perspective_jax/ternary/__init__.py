"""Ternary experts (SPEC §3.4): quantisation-aware training and packed formats."""

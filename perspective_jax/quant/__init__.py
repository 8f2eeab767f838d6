"""Quantisation (SPEC §3.4): ternary absmean STE, GPTQ group-wise codes for shared
weights, int8 tied embedding, and the packed kernel type the model reads."""

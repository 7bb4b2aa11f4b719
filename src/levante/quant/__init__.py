"""Quantized weights: GGUF block formats and weight-only int8/int4 linears."""

"""Early-exit causal LMs: token-level exits over a transformers decoder-only model."""

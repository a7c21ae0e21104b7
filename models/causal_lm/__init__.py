"""Early-exit causal LMs: token-level exits over a transformers decoder-only model."""

# The built-in causal LMs `bin/e3-node --model NAME` serves (the names are part of the interface);
# here, with no imports, so the CLI can tell an LM from a classifier without loading torch.
LLM_MODELS = ("gemma3-270m",)

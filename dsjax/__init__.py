"""dsjax: distributed LLM training on JAX/XLA."""

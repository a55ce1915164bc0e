"""dsjax: distributed LLM training on JAX/XLA.

Submodules carry the API: `dsjax.config` (Config and presets), `dsjax.train` (build / fit / train),
`dsjax.amp` (autocast), `dsjax.optim` (GradientScaler, the optimizer), `dsjax.nn` (CheckpointModule).
"""

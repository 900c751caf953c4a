"""The ``jax-lora train`` job: config, data, metrics and the training loop (thin wrappers over jax_lora)."""

"""Implementation modules of jax_lora; the public API is re-exported by jax_lora and its public submodules."""

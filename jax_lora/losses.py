"""Losses for LM training: token cross-entropy, and the LM head + cross-entropy in chunks
(never holding (tokens x vocab) logits)."""

from jax_lora._src.losses import chunked_token_nll
from jax_lora._src.losses import token_nll

__all__ = [
    "token_nll",
    "chunked_token_nll",
]

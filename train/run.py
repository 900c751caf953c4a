"""``jax-lora train CONFIG.yaml [key=value ...]`` (also ``python -m train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the command line, loads and validates the config, and trains.

  Returns 0 on success; a bad config prints one line on stderr and returns 1.
  """
  p = argparse.ArgumentParser(prog="jax-lora train", description="Fine-tune a causal LM with LoRA/QLoRA/full.")
  p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults = configs/default.yaml)")
  p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (e.g. optim.lr=1e-3)")
  p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  if args.config is not None and "=" in args.config:  # only overrides given
    args.overrides, args.config = [args.config, *args.overrides], None
  from .config import config_to_dict, load_config

  try:
    cfg = load_config(args.config, args.overrides)
  except ValueError as e:
    print(f"jax-lora train: error: {e}", file=sys.stderr)
    return 1
  if args.dry_run:
    import yaml

    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0
  from .loop import train

  try:
    train(cfg)
  except ValueError as e:
    print(f"jax-lora train: error: {e}", file=sys.stderr)
    return 1
  return 0

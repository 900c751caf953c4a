"""``jax-lora train CONFIG.yaml [key=value ...]`` (also ``python -m train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the command line, loads and validates the config, and trains.

  Returns 0 on success; any failure prints one line on stderr and returns 1
  (130 when interrupted by Ctrl-C: the run stops after its current step, saves a
  checkpoint, and the same command resumes it).
  """
  p = argparse.ArgumentParser(prog="jax-lora train", description="Fine-tune a causal LM with LoRA/QLoRA/full.")
  p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults = configs/default.yaml)")
  p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (e.g. optim.lr=1e-3)")
  p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
  again = p.add_mutually_exclusive_group()
  again.add_argument("--resume-changed", action="store_true",
                     help="out_dir holds a run with another config: continue its checkpoint under this config "
                          "(without a flag such a re-run is refused, naming the differing keys)")
  again.add_argument("--fresh", action="store_true",
                     help="out_dir holds a run: delete its outputs (never files it did not write) and start at step 0")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  if args.config is not None and "=" in args.config:  # only overrides given
    args.overrides, args.config = [args.config, *args.overrides], None
  try:
    from .config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
      import yaml

      print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
      return 0
    from .loop import train

    train(cfg, on_change="resume" if args.resume_changed else "fresh" if args.fresh else "refuse")
    return 0
  except KeyboardInterrupt:  # outside the training steps (loading, evaluation, export)
    return _fail("interrupted before the run finished; re-run the same command to resume "
                 "(from the last checkpoint, if any)", 130)
  except ModuleNotFoundError as e:
    from .cli import _HF_EXTRA

    hint = "; training needs the checkpoint/data stack: pip install 'jax-lora[hf]'" if e.name in _HF_EXTRA else ""
    return _fail(f"{e}{hint}")
  except OSError as e:
    from .cli import os_error_line

    return _fail(os_error_line(e))
  except ValueError as e:  # bad config or data, a stop on purpose (divergence, Ctrl-C): one line
    return _fail(" ".join(str(e).split()), getattr(e, "exit_code", 1))
  except Exception as e:  # noqa: BLE001 - the contract is one line on stderr, whatever failed
    return _fail(f"{type(e).__name__}: {' '.join(str(e).split())}")


def _fail(msg: str, code: int = 1) -> int:
  print(f"jax-lora train: error: {msg}", file=sys.stderr)
  return code

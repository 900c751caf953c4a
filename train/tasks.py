"""Builders of the two shipped fine-tuning tasks, from text Debian installs offline.

* ``de_en``: German → English sentence pairs from the Ding dictionary of
  ``trans-de-en`` (``/usr/share/trans/de-en``).
* ``wordnet_gloss``: word → definition from ``wordnet-base``
  (``/usr/share/wordnet/data.{noun,verb,adj,adv}``).

Both become prompt/completion jsonl files (``train``, ``validation``, ``test``)
split deterministically by a seed, with no source item in two splits. Files are
written atomically (temporary name, then rename), so a half-written cache is
never read.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence

from jax_lora.files import write_text

__all__ = [
    "TASKS",
    "DE_EN_PROMPT",
    "WORDNET_PROMPT",
    "ding_pairs",
    "de_en_rows",
    "wordnet_entries",
    "wordnet_rows",
    "split_groups",
    "write_jsonl",
    "build_task",
    "default_data_cache",
]

DE_EN_PROMPT = "Translate German to English.\nGerman: {de}\nEnglish:"
WORDNET_PROMPT = 'Define the word "{lemma}" ({pos}).\nDefinition:'
DING_FILE = "/usr/share/trans/de-en"
WORDNET_DIR = "/usr/share/wordnet"
_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}

# Annotations of the Ding format: {f} gender/part of speech, [Br.] usage, (etw.) notes.
_ANNOT = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|\([^()]*\)")
_SPACE = re.compile(r"\s+")
_END = (".", "?", "!")


def default_data_cache() -> str:
  """``$JAX_LORA_DATA`` or ``~/.cache/jax_lora/data``: where built task splits live."""
  default = os.path.join(os.path.expanduser("~"), ".cache", "jax_lora", "data")
  return os.environ.get("JAX_LORA_DATA", default)


def _clean(text: str) -> str:
  """Removes Ding annotations (repeatedly, for nested ones) and normalizes spaces."""
  prev = None
  while prev != text:
    prev, text = text, _ANNOT.sub(" ", text)
  text = _SPACE.sub(" ", text).strip()
  return re.sub(r"\s+([.,?!;:])", r"\1", text)


def _is_sentence(text: str, min_words: int) -> bool:
  """A clean sentence: enough words, final punctuation, no leftover markup or placeholders."""
  if len(text.split()) < min_words or not text.endswith(_END):
    return False
  if any(c in text for c in "{}[]()/~|;<>"):
    return False
  return not re.search(r"\b(etw|jdm|jdn|jds|sth|sb)\b", text)


def ding_pairs(lines: Iterable[str], min_words: int = 5) -> list[tuple[str, str]]:
  """Clean German/English sentence pairs of a Ding dictionary.

  Each line is ``de :: en``; both sides hold the same number of ``|``-separated
  alternatives, aligned one to one. Annotations in ``{}``, ``[]`` and ``()`` are
  dropped; a pair is kept when both sides are sentences of at least
  ``min_words`` words ending in ``.``, ``?`` or ``!``.

  Args:
    lines: lines of the dictionary file (comments start with ``#``).
    min_words: the fewest words either side may have.

  Returns:
    The kept ``(de, en)`` pairs in file order, exact duplicates removed.
  """
  out, seen = [], set()
  for line in lines:
    if line.startswith("#") or " :: " not in line:
      continue
    de_side, en_side = line.rstrip("\n").split(" :: ", 1)
    de_alts, en_alts = de_side.split(" | "), en_side.split(" | ")
    if len(de_alts) != len(en_alts):
      continue
    for de, en in zip(de_alts, en_alts):
      de, en = _clean(de), _clean(en)
      if _is_sentence(de, min_words) and _is_sentence(en, min_words) and (de, en) not in seen:
        seen.add((de, en))
        out.append((de, en))
  return out


def split_groups(keys: Sequence[str], seed: int, n_test: int, n_validation: int) -> dict[str, list[int]]:
  """Splits item indices into train/validation/test so that equal keys share a split.

  Distinct keys are shuffled with ``random.Random(seed)``; test takes the first
  keys until it holds at least ``n_test`` items, validation the next until
  ``n_validation``, and train the rest.

  Args:
    keys: one grouping key per item (e.g. the German sentence or the lemma).
    seed: the shuffle seed; the split is a pure function of (keys, seed).
    n_test: minimum number of test items.
    n_validation: minimum number of validation items.

  Returns:
    ``{"train": [...], "validation": [...], "test": [...]}`` of item indices, each sorted.
  """
  groups: dict[str, list[int]] = {}
  for i, k in enumerate(keys):
    groups.setdefault(k, []).append(i)
  order = sorted(groups)
  random.Random(seed).shuffle(order)
  if n_test + n_validation >= len(keys):
    raise ValueError(f"{len(keys)} items cannot give {n_test} test and {n_validation} validation items and a train split; lower them")
  splits: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
  for k in order:
    name = "test" if len(splits["test"]) < n_test else "validation" if len(splits["validation"]) < n_validation else "train"
    splits[name].extend(groups[k])
  return {k: sorted(v) for k, v in splits.items()}


def de_en_rows(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
  """Prompt/completion rows of German → English pairs (completion starts with a space)."""
  return [{"prompt": DE_EN_PROMPT.format(de=de), "completion": f" {en}"} for de, en in pairs]


def _gloss(text: str) -> str:
  """The definition part of a WordNet gloss: the text before the first quoted example."""
  definition = text.split('"', 1)[0]
  return _SPACE.sub(" ", definition).strip(" ;:")


def wordnet_entries(wordnet_dir: str = WORDNET_DIR) -> list[tuple[str, str, str]]:
  """``(lemma, pos, definition)`` for every (first-listed) lemma of every WordNet synset.

  Only the first word of each synset is used (the most common name), with
  underscores turned into spaces; synsets with empty definitions are skipped.
  Entries are returned in file order, exact duplicates removed.
  """
  out, seen = [], set()
  for suffix, pos in _POS.items():
    path = os.path.join(wordnet_dir, f"data.{suffix}")
    if not os.path.exists(path):
      raise ValueError(f"{path} is missing; install it with: apt-get install wordnet-base")
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("  ") or " | " not in line:
          continue  # licence header
        head, gloss = line.rstrip("\n").split(" | ", 1)
        fields = head.split()
        lemma = re.sub(r"\(.*\)$", "", fields[4]).replace("_", " ")
        definition = _gloss(gloss)
        if definition and (lemma, pos, definition) not in seen:
          seen.add((lemma, pos, definition))
          out.append((lemma, pos, definition))
  return out


def wordnet_rows(entries: Sequence[tuple[str, str, str]]) -> list[dict[str, str]]:
  """Prompt/completion rows of WordNet entries."""
  return [{"prompt": WORDNET_PROMPT.format(lemma=l, pos=p), "completion": f" {d}"} for l, p, d in entries]


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  """Writes one JSON object per line, atomically (temporary file, then rename)."""
  write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


TASKS = ("de_en", "wordnet_gloss")
# (test, validation) sizes; wordnet keeps a subsample of train (117k synsets is far more than a CPU run uses).
_SIZES = {"de_en": (300, 300), "wordnet_gloss": (300, 300)}
_WORDNET_TRAIN = 20_000


def build_task(task: str, cache_dir: str | None = None, seed: int = 0) -> dict[str, str]:
  """Builds (once) the jsonl splits of a shipped task and returns their paths.

  The files are ``<cache_dir>/<task>-seed<seed>/{train,validation,test}.jsonl``;
  if all three exist they are reused as they are.

  Args:
    task: ``"de_en"`` or ``"wordnet_gloss"``.
    cache_dir: parent folder (default :func:`default_data_cache`).
    seed: split seed.

  Returns:
    ``{"train": path, "validation": path, "test": path}``.
  """
  if task not in TASKS:
    raise ValueError(f"unknown data.task {task!r}; use one of {', '.join(TASKS)}")
  folder = os.path.join(cache_dir or default_data_cache(), f"{task}-seed{seed}")
  paths = {s: os.path.join(folder, f"{s}.jsonl") for s in ("train", "validation", "test")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  n_test, n_val = _SIZES[task]
  if task == "de_en":
    if not os.path.exists(DING_FILE):
      raise ValueError(f"{DING_FILE} is missing; install it with: apt-get install trans-de-en")
    with open(DING_FILE, encoding="utf-8") as f:
      pairs = ding_pairs(f)
    rows, keys = de_en_rows(pairs), [de for de, _ in pairs]
  else:
    entries = wordnet_entries()
    rows, keys = wordnet_rows(entries), [lemma.lower() for lemma, _, _ in entries]
  idx = split_groups(keys, seed, n_test, n_val)
  if task == "wordnet_gloss" and len(idx["train"]) > _WORDNET_TRAIN:
    idx["train"] = sorted(random.Random(seed + 1).sample(idx["train"], _WORDNET_TRAIN))
  for name, ids in idx.items():
    order = list(ids)
    random.Random(f"{seed}-{name}").shuffle(order)  # file order carries no dictionary order
    write_jsonl(paths[name], (rows[i] for i in order))
  return paths

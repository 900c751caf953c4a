"""Scores of generated text: sacreBLEU and ROUGE-1/2/L, plus cleaning of decoded output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bleu", "rouge", "postprocess", "decode_generated", "score"]


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references; pass one reference per hypothesis")
  if not hyps:
    raise ValueError("no hypotheses to score; decode at least one test prompt (eval.num_test >= 1)")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus sacreBLEU (default 13a tokenization, one reference each), 0..100."""
  import sacrebleu

  _check(hyps, refs)
  return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measures (rouge-score, Porter stemming), 0..100."""
  from rouge_score import rouge_scorer

  _check(hyps, refs)
  keys = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
  per = [scorer.score(r, h) for h, r in zip(hyps, refs)]  # score(target, prediction)
  return {k: 100.0 * float(np.mean([s[k].fmeasure for s in per])) for k in keys}


def postprocess(text: str, eos_token: str | None = None) -> str:
  """Generated text up to the first EOS token string or newline, stripped."""
  if eos_token:
    text = text.split(eos_token, 1)[0]
  return text.split("\n", 1)[0].strip()


def decode_generated(tokenizer: Any, tokens: np.ndarray, eos_token_id: int | None) -> list[str]:
  """Decodes each row of generated ids up to (not including) its first EOS, then :func:`postprocess`."""
  out = []
  for row in np.asarray(tokens):
    ids = row.tolist()
    if eos_token_id is not None and eos_token_id in ids:
      ids = ids[: ids.index(eos_token_id)]
    out.append(postprocess(tokenizer.decode(ids, skip_special_tokens=True)))
  return out


def score(metrics: Sequence[str], hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """The named metrics (``"bleu"``, ``"rouge"``) as one flat dict."""
  out: dict[str, float] = {}
  for m in metrics:
    if m == "bleu":
      out["bleu"] = bleu(hyps, refs)
    elif m == "rouge":
      out.update(rouge(hyps, refs))
    else:
      raise ValueError(f"unknown metric {m!r}; use 'bleu' or 'rouge'")
  return out

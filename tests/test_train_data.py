"""train.tasks, train.data and train.metrics against independent references."""

import json
import os
import random

import numpy as np
import pytest

from jax_lora_app import data as td
from jax_lora_app import metrics as tm
from jax_lora_app import tasks as tt

# ----------------------------------------------------------------------------- tokenizers


def _word_tokenizer():
  """A tiny word-level HF tokenizer built locally (no hub)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = "<pad> </s> <unk> Translate German to English . : German English I am here Ich bin hier a b c d e f".split()
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
  from jax_lora.models.gguf import tokenizer_from_gguf
  from jax_lora.models.shipped import smollm2_gguf_path

  return tokenizer_from_gguf(smollm2_gguf_path(), cache_dir=str(tmp_path_factory.mktemp("tok") / "smollm2"))


# ----------------------------------------------------------------------------- tasks

DING = """# comment :: line
Haus {n} | Häuser {pl} :: house | houses
Ich habe am Entwurf ein paar Änderungen vorgenommen. | Er kommt morgen (vielleicht) wieder zurück. :: I made a few changes to the design. | He will (perhaps) be back again tomorrow.
Das ist ein sehr kurzer Satz {m}. :: This is a very short sentence [Br.].
Zu kurz. :: Too short here.
Das ist eine Frage an dich? :: Is this a question for you? | extra
Er gibt jdm. etwas zu essen. :: He gives sb. something to eat.
"""


def test_ding_pairs_known_answer():
  pairs = tt.ding_pairs(DING.splitlines(keepends=True))
  assert pairs == [
      ("Ich habe am Entwurf ein paar Änderungen vorgenommen.", "I made a few changes to the design."),
      ("Er kommt morgen wieder zurück.", "He will be back again tomorrow."),
      ("Das ist ein sehr kurzer Satz.", "This is a very short sentence."),
  ]


def test_split_groups_disjoint_and_deterministic():
  keys = [f"k{i % 37}" for i in range(200)]
  a = tt.split_groups(keys, seed=3, n_test=20, n_validation=30)
  assert a == tt.split_groups(keys, seed=3, n_test=20, n_validation=30)
  assert a != tt.split_groups(keys, seed=4, n_test=20, n_validation=30)
  assert sorted(a["train"] + a["validation"] + a["test"]) == list(range(200))
  groups = {s: {keys[i] for i in ids} for s, ids in a.items()}
  assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"] and not groups["test"] & groups["validation"]
  assert len(a["test"]) >= 20 and len(a["validation"]) >= 30
  with pytest.raises(ValueError, match="lower them"):
    tt.split_groups(keys, seed=0, n_test=150, n_validation=50)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def de_en(tmp_path_factory):
  return tt.build_task("de_en", str(tmp_path_factory.mktemp("data")), seed=0)


def test_de_en_build(de_en):
  rows = {s: _read(p) for s, p in de_en.items()}
  assert len(rows["test"]) >= 150 and len(rows["validation"]) >= 300 and len(rows["train"]) > 10_000
  german = {}
  for s, rs in rows.items():
    for r in rs:
      assert r["prompt"].startswith("Translate German to English.\nGerman: ") and r["prompt"].endswith("\nEnglish:")
      assert r["completion"].startswith(" ") and r["completion"].rstrip().endswith((".", "?", "!"))
      de = r["prompt"].split("\nGerman: ")[1].split("\nEnglish:")[0]
      assert len(de.split()) >= 5 and not any(c in de + r["completion"] for c in "{}[]")
      german.setdefault(de, set()).add(s)
  assert all(len(v) == 1 for v in german.values()), "a German sentence appears in two splits"
  # Independent re-read of the dictionary: every kept pair is one aligned alternative of one line.
  sample = random.Random(0).sample(rows["test"], 20)
  text = open(tt.DING_FILE, encoding="utf-8").read()
  for r in sample:
    de = r["prompt"].split("\nGerman: ")[1].split("\nEnglish:")[0]
    assert de.split()[0] in text


def test_build_is_cached_and_deterministic(de_en, tmp_path):
  again = tt.build_task("de_en", os.path.dirname(os.path.dirname(de_en["train"])), seed=0)
  assert again == de_en
  other = tt.build_task("de_en", str(tmp_path), seed=0)
  for s in de_en:
    assert open(other[s], "rb").read() == open(de_en[s], "rb").read()
  assert not [f for f in os.listdir(os.path.dirname(other["train"])) if f.startswith(".tmp")]


def test_wordnet_build(tmp_path):
  paths = tt.build_task("wordnet_gloss", str(tmp_path), seed=1)
  rows = {s: _read(p) for s, p in paths.items()}
  assert len(rows["test"]) >= 150 and len(rows["validation"]) >= 300 and len(rows["train"]) >= 10_000
  lemmas = {}
  for s, rs in rows.items():
    for r in rs:
      assert r["prompt"].startswith('Define the word "') and r["prompt"].endswith(").\nDefinition:")
      assert r["completion"].startswith(" ") and '"' not in r["completion"]
      lemmas.setdefault(r["prompt"].split('"')[1].lower(), set()).add(s)
  assert all(len(v) == 1 for v in lemmas.values()), "a lemma appears in two splits"


def test_wordnet_gloss_drops_examples():
  assert tt._gloss('a domestic animal; "the dog barked all night"') == "a domestic animal"
  assert tt._gloss('move fast; run quickly; "he ran"; "she sprinted"') == "move fast; run quickly"


def test_unknown_task(tmp_path):
  with pytest.raises(ValueError, match="unknown data.task 'xx'"):
    tt.build_task("xx", str(tmp_path))


# ----------------------------------------------------------------------------- tokenization


def test_loss_mask_covers_completion_word_tokenizer():
  tok = _word_tokenizer()
  ex = td.tokenize_row(tok, {"prompt": "Translate German to English . German : Ich bin hier . English :", "completion": " I am here ."}, 64)
  ref_prompt = tok("Translate German to English . German : Ich bin hier . English :")["input_ids"]
  ref_completion = tok("I am here .")["input_ids"]
  assert ex.ids.tolist() == ref_prompt + ref_completion + [tok.eos_token_id]
  assert ex.loss_mask.tolist() == [0] * len(ref_prompt) + [1] * (len(ref_completion) + 1)
  text = td.tokenize_row(tok, {"text": "a b c"}, 64)
  assert text.ids.tolist() == tok("a b c")["input_ids"] + [tok.eos_token_id]
  assert text.loss_mask.tolist() == [0, 1, 1, 1]
  short = td.tokenize_row(tok, {"text": "a b c d e f"}, 4)
  assert short.ids.tolist() == tok("a b c d")["input_ids"] and len(short.loss_mask) == 4


def test_loss_mask_covers_completion_smollm2(smollm2_tokenizer, de_en):
  tok = smollm2_tokenizer
  for row in _read(de_en["test"])[:20]:
    ex = td.tokenize_row(tok, row, 256)
    joint = tok(row["prompt"] + row["completion"])["input_ids"]  # reference: one joint tokenization
    prompt = tok(row["prompt"])["input_ids"]
    assert ex.ids.tolist() == joint + [tok.eos_token_id]
    assert ex.loss_mask.tolist() == [0] * len(prompt) + [1] * (len(joint) - len(prompt) + 1)
    target = ex.ids[ex.loss_mask == 1]
    assert tok.decode(target[:-1]) == row["completion"] and target[-1] == tok.eos_token_id


def test_load_rows(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"prompt": "x", "completion": " y"}\n{"prompt": "z", "completion": " w"}\n')
  assert td.load_rows(str(p)) == [{"prompt": "x", "completion": " y"}, {"prompt": "z", "completion": " w"}]
  q = tmp_path / "b.jsonl"
  q.write_text('{"question": "x"}\n')
  with pytest.raises(ValueError, match="rows need a 'text' field or 'prompt' and 'completion'"):
    td.load_rows(str(q))


# ----------------------------------------------------------------------------- batching


def _examples(n, seed=0, max_len=40):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    k = int(rng.integers(3, max_len))
    ids = np.full(k, 1000 + i, np.int32)  # every token names its example
    mask = np.ones(k, np.int32)
    mask[0] = 0
    out.append(td.Example(ids, mask))
  return out


def _ids_of(batch):
  return [set(row[row >= 1000].tolist()) for row in batch["input_ids"]]


@pytest.mark.parametrize("packing", [False, True], ids=["bucketing", "packing"])
def test_batches_resumable_and_cover_each_epoch(packing):
  ex = _examples(101)
  a = td.Batcher(ex, batch_size=4, seq_len=48, pad_id=0, seed=7, packing=packing)
  b = td.Batcher(ex, batch_size=4, seq_len=48, pad_id=0, seed=7, packing=packing)
  steps = a.steps_per_epoch(0) + a.steps_per_epoch(1) + 3
  seq = [a.batch_at(s) for s in range(steps)]
  for s in [steps - 1, 0, a.steps_per_epoch(0) + 1, 5]:  # fresh object, random access
    for k in seq[s]:
      np.testing.assert_array_equal(b.batch_at(s)[k], seq[s][k])
  seen = [i for batch in seq[: a.steps_per_epoch(0)] for row in _ids_of(batch) for i in row]
  assert len(seen) == len(set(seen)), "an example repeats within an epoch"
  assert len(seen) >= 101 - (0 if packing else 3) - (40 if packing else 0)
  c = td.Batcher(ex, batch_size=4, seq_len=48, pad_id=0, seed=8, packing=packing)
  assert any(not np.array_equal(c.batch_at(s)["input_ids"], seq[s]["input_ids"]) for s in range(3))
  for batch in seq:
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 16 == 0 and batch["input_ids"].shape[1] <= 48
    assert ((batch["attention_mask"] == 0) <= (batch["loss_mask"] == 0)).all()  # no loss on padding
    assert ((batch["attention_mask"] == 0) == (batch["input_ids"] == 0)).all()


def test_bucketing_pads_to_multiple_of_bucket():
  ex = _examples(64, max_len=20)
  batches = td.Batcher(ex, batch_size=8, seq_len=96, pad_id=0, seed=0, bucket=16)
  for s in range(batches.steps_per_epoch()):
    b = batches.batch_at(s)
    longest = int(b["attention_mask"].sum(1).max())
    assert b["input_ids"].shape[1] == max(16, -(-longest // 16) * 16)


def test_packing_segments_and_loss_mask():
  ex = _examples(30, max_len=12)
  b = td.Batcher(ex, batch_size=2, seq_len=32, pad_id=0, seed=0, packing=True).batch_at(0)
  for row_ids, seg, loss in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
    starts = [s for s in starts if seg[s] > 0]
    assert all(loss[s] == 0 for s in starts)  # no loss across example boundaries
    for k in set(seg.tolist()) - {0}:
      assert len(set(row_ids[seg == k].tolist())) == 1  # one example per segment


def test_eval_batches_cover_all_once():
  ex = _examples(21)
  batches = td.eval_batches(ex, batch_size=4, seq_len=48, pad_id=0)
  assert len(batches) == 6 and all(b["input_ids"].shape[0] == 4 for b in batches)
  total = sum(int(b["loss_mask"].sum()) for b in batches)
  assert total == sum(int(e.loss_mask.sum()) for e in ex)


def test_num_steps():
  b = td.Batcher(_examples(40), batch_size=8, seq_len=48, pad_id=0)
  assert b.num_steps(13, 5.0) == 13 and b.num_steps(0, 2.0) == 10 and b.num_steps(0, 0.5) == 3


def test_encode_prompts():
  tok = _word_tokenizer()
  ids, mask = td.encode_prompts(tok, ["a b c", "a"], pad_id=0, bucket=4)
  assert ids.shape == (2, 4)
  assert ids[0, :3].tolist() == tok("a b c")["input_ids"] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


# ----------------------------------------------------------------------------- metrics

HYPS = ["the cat sat on the mat", "a quick brown fox jumps", "I am here."]
REFS = ["the cat is on the mat", "the quick brown fox jumped over", "I am here."]


def test_bleu_matches_sacrebleu():
  import sacrebleu

  assert tm.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
  assert tm.bleu(["I am here ."], ["I am here ."]) == pytest.approx(100.0)
  with pytest.raises(ValueError, match="one reference per hypothesis"):
    tm.bleu(HYPS, REFS[:2])


def test_rouge_matches_rouge_score():
  from rouge_score import rouge_scorer

  s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  got = tm.rouge(HYPS, REFS)
  for k in ("rouge1", "rouge2", "rougeL"):
    assert got[k] == pytest.approx(100 * np.mean([s.score(r, h)[k].fmeasure for h, r in zip(HYPS, REFS)]))
  # Hand-computed: unigram overlap of "the cat sat on the mat" / "the cat is on the mat" is 5 of 6.
  assert tm.rouge(HYPS[:1], REFS[:1])["rouge1"] == pytest.approx(100 * 5 / 6)
  assert tm.score(["bleu", "rouge"], HYPS, REFS).keys() == {"bleu", "rouge1", "rouge2", "rougeL"}


def test_postprocess_and_decode():
  assert tm.postprocess(" I am here.\nGerman: more") == "I am here."
  assert tm.postprocess(" Yes</s> junk", "</s>") == "Yes"
  tok = _word_tokenizer()
  gen = np.array([tok("I am here .")["input_ids"] + [tok.eos_token_id, 0], tok("a b c d e f")["input_ids"]])
  assert tm.decode_generated(tok, gen, tok.eos_token_id) == ["I am here .", "a b c d e f"]

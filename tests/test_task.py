"""Tests for support/task.py: the built-in task, its gold judge and its simulated labellers."""

import math
import random

import pytest

from support import task
from support.data import Tokenizer
from support.task import GOLD_MAX, GOLD_MIN, format_prompt, gold_score, gold_terms

HAPPY_SEA = format_prompt("Write a happy sentence about the sea.")
BANANA = format_prompt("What color is a banana?")
COW = format_prompt("What sound does a cow make?")
SUM_3_4 = format_prompt("What is 3 plus 4?")


def test_same_seed_same_data_other_seed_other_data():
    assert task.make_prompts(100, "train", seed=0) == task.make_prompts(100, "train", seed=0)
    assert task.make_prompts(100, "train", seed=0) != task.make_prompts(100, "train", seed=1)
    assert task.demonstrations(100, seed=3) == task.demonstrations(100, seed=3)
    assert task.demonstrations(100, seed=3) != task.demonstrations(100, seed=4)
    assert task.preferences(100, seed=5) == task.preferences(100, seed=5)
    assert task.preferences(100, seed=5) != task.preferences(100, seed=6)
    assert task.preferences(50, seed=5, k=3) == task.preferences(50, seed=5, k=3)


def test_eval_prompts_never_in_train():
    train_pool = {r for pool in task.POOLS["train"].values() for r in pool}
    eval_pool = {r for pool in task.POOLS["eval"].values() for r in pool}
    assert not train_pool & eval_pool
    assert train_pool | eval_pool == set(task.SPECS)
    assert 0.1 < len(eval_pool) / len(task.SPECS) < 0.3
    train, evals = task.make_prompts(3000, "train"), task.make_prompts(1000, "eval", seed=7)
    assert not set(train) & set(evals)
    assert {task.parse_prompt(p).kind for p in evals} == set(task.KINDS)
    with pytest.raises(ValueError):
        task.make_prompts(3, "test")


def test_prompt_and_answer_format():
    for prompt in task.make_prompts(200, "train"):
        assert prompt.startswith("Human: ") and prompt.endswith("\n\nAssistant:")
    for row in task.demonstrations(200):
        assert set(row) == {"prompt", "response"}
        assert row["response"].startswith(" ") and not row["response"].startswith("  ")


def test_every_reference_answer_scores_gold_max():
    for request in task.SPECS:
        prompt = format_prompt(request)
        assert gold_score(prompt, task.reference_answer(prompt)) == GOLD_MAX, prompt


@pytest.mark.parametrize("prompt, degraded, term", [
    (HAPPY_SEA, " The sea is dark and cold.", "content"),                       # wrong mood
    (HAPPY_SEA, " The sea is lovely and dark.", "content"),                     # mixed mood
    (HAPPY_SEA, " It is calm and lovely.", "topic"),                            # topic missing
    (HAPPY_SEA, " The sea is there.", "content"),                               # no mood at all
    (HAPPY_SEA, " The sea is calm calm and lovely.", "repetition"),
    (HAPPY_SEA, " The sea is calm and lovely, and my uncle bought a new car.", "off_task"),
    (HAPPY_SEA, " Every time I see the sea I feel calm and today it looks lovely and warm and "
                "sweet here.", "length"),
    (HAPPY_SEA, " The sea is calm, warm, sweet, bright and lovely.", "stuffing"),
    (HAPPY_SEA, " The sea is calm and lovely", "period"),
    (HAPPY_SEA, " The sea is calm and lovely..", "period"),
    (HAPPY_SEA, " The sea is calm. It is lovely.", "period"),
    (HAPPY_SEA, " the sea is calm and lovely.", "capital"),
    (SUM_3_4, " 3 plus 4 is 8.", "content"),                                   # wrong number
    (SUM_3_4, " 3 plus 4 is 7 7 7.", "repetition"),
    (SUM_3_4, " The answer is 7.", "topic"),
    (BANANA, " A banana is red.", "content"),
    (BANANA, " A lemon is yellow.", "topic"),
    (COW, " A cow says woof.", "content"),
    (COW, " A cow says moo moo.", "repetition"),
])
def test_reference_beats_each_degraded_answer(prompt, degraded, term):
    best = {"topic": 1.0, "content": 1.0, "capital": 0.5, "period": 0.5}
    assert gold_score(prompt, task.reference_answer(prompt)) == GOLD_MAX
    assert gold_score(prompt, degraded) < GOLD_MAX
    assert gold_terms(prompt, degraded)[term] < best.get(term, 0.0)


def test_gold_score_by_hand():
    # happy sea, "dark": topic 1 + content -1 + capital 0.5 + period 0.5
    assert gold_score(HAPPY_SEA, " The sea is dark.") == 1.0
    # topic 1 + content 1, no capital, no period
    assert gold_score(HAPPY_SEA, "the sea is calm") == 2.0
    # 4 extra "lovely" = -2.0 (the cap); 5 distinct mood words = stuffing -0.5: 3 - 2.0 - 0.5
    assert gold_score(HAPPY_SEA, " The sea is calm, warm, sweet, bright and lovely lovely lovely "
                                 "lovely lovely.") == 0.5
    # 3 + 0 = 3 without restating the operands: right answer, no topic
    assert gold_score(format_prompt("What is 3 plus 0?"), " The answer is 3.") == 2.0
    # restates the operands but claims nothing
    assert gold_score(SUM_3_4, " You have to add 3 and 4.") == 2.0
    # 3 plus 3 says 3 twice: not a repetition
    assert gold_score(format_prompt("What is 3 plus 3?"), " 3 plus 3 is 6.") == GOLD_MAX
    # nothing asked is done, nothing is wrong: 0
    assert gold_score(BANANA, "") == 0.0
    # off-task: "banana" is another prompt's topic, "uncle bought" ramble; 3 words at -0.25 each
    assert gold_terms(HAPPY_SEA, " The sea is calm, and my uncle bought a banana.")["off_task"] == -0.75


def test_gold_score_never_raises_on_junk():
    rng = random.Random(0)
    printable = [chr(c) for c in range(32, 127)]
    junk = ["", " ", "\n\n", ".", "....", "\x00\x01", "🌊🌊🌊", "Ünïcödé ÿ 日本語 мир.",
            "".join(rng.choice(printable) for _ in range(500)),
            "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(500)),
            " The sea is calm." * 200, " 3 plus 4 is 7" * 50, " İ" + "9" * 400]
    for prompt in (HAPPY_SEA, BANANA, COW, SUM_3_4):
        for answer in junk:
            score = gold_score(prompt, answer)
            assert isinstance(score, float) and GOLD_MIN <= score <= GOLD_MAX
            assert math.isfinite(score)
    assert gold_score(HAPPY_SEA, junk[8]) < 0   # garbage is worse than saying nothing


def test_unknown_prompt_is_an_error():
    with pytest.raises(ValueError):
        gold_score(format_prompt("What is the capital of France?"), " Paris.")
    # the bare request works as well as the chat-wrapped prompt
    assert gold_score("What is 3 plus 4?", " 3 plus 4 is 7.") == GOLD_MAX


def test_demonstrations_leave_room_to_improve():
    demos = task.demonstrations(2000)
    golds = [gold_score(d["prompt"], d["response"]) for d in demos]
    mean = sum(golds) / len(golds)
    assert 1.0 < mean < GOLD_MAX - 0.7
    assert 0.2 < sum(g == GOLD_MAX for g in golds) / len(golds) < 0.5   # SFT still sees good answers


def test_reward_hacking_answer_has_more_mood_words_but_lower_gold():
    hacked = " The sea is happy happy bright bright lovely lovely lovely warm warm sweet sweet"
    assert gold_score(HAPPY_SEA, hacked) < 1.0 < GOLD_MAX


def test_rambles_are_off_task_for_every_kind():
    for prompt in (HAPPY_SEA, BANANA, COW, SUM_3_4):
        for clause in task.RAMBLES:
            answer = task.reference_answer(prompt)[:-1] + ", " + clause + "."
            assert gold_terms(prompt, answer)["off_task"] < 0, answer


def test_bradley_terry_probability():
    rng = random.Random(0)
    wins = sum(task.noisy_ranking([1.0, 0.0], 1.0, rng)[0] == 0 for _ in range(20000))
    assert abs(wins / 20000 - 1 / (1 + math.exp(-1.0))) < 0.015   # sigmoid(1) = 0.731
    assert task.noisy_ranking([0.0, 2.0, 1.0], 0.0, rng) == [1, 2, 0]


def test_label_agreement_follows_noise():
    perfect = task.preferences(1000, noise=0.0)
    assert task.label_agreement(perfect) == 1.0
    noisy = task.preferences(1000, noise=1.0)
    assert 0.6 < task.label_agreement(noisy) < 0.98
    for row in noisy:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert row["chosen"] != row["rejected"]
        assert row["chosen_score"] == gold_score(row["prompt"], row["chosen"])
    # without the score fields, label_agreement asks the gold judge itself
    bare = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in noisy]
    assert task.label_agreement(bare) == task.label_agreement(noisy)


def test_k_way_rankings():
    for row in task.preferences(200, k=4, noise=0.0):
        assert set(row) == {"prompt", "answers", "scores"}
        assert len(set(row["answers"])) == 4
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert row["scores"] == [gold_score(row["prompt"], a) for a in row["answers"]]
    noisy = task.preferences(200, k=3, noise=1.0)
    assert all(len(set(row["answers"])) == 3 for row in noisy)
    assert any(row["scores"] != sorted(row["scores"], reverse=True) for row in noisy)
    with pytest.raises(ValueError):
        task.preferences(1, k=1)


def test_everything_tokenizes_short():
    enc = Tokenizer()
    for request in task.SPECS:
        prompt = format_prompt(request)
        assert len(enc.encode(prompt)) <= 32
        assert len(enc.encode(task.reference_answer(prompt))) <= 32
    for row in task.demonstrations(3000, seed=1):
        assert len(enc.encode(row["response"])) <= 32
    for row in task.preferences(300, k=4, seed=1):
        assert all(len(enc.encode(a)) <= 32 for a in row["answers"])


def test_compact_vocabulary_round_trips_everything_the_task_writes():
    """Every prompt, reference answer, demonstration (every content mode and flaw) and hacked answer
    encodes into the compact table and decodes back to the same text, and means the same GPT-2 tokens."""
    tok, gpt2 = Tokenizer.for_texts(task.vocabulary_texts()), Tokenizer()
    assert tok.vocab_size < 1100 and tok.decode([tok.eos_id]) == "<|endoftext|>"
    texts = [format_prompt(r) for r in task.SPECS] + [task.reference_answer(format_prompt(r)) for r in task.SPECS]
    rng = random.Random(0)
    for split in ("train", "eval"):
        for prompt in task.make_prompts(2000, split, seed=3):
            texts += [task.sample_answer(prompt, rng) for _ in range(3)]
    spec = task.parse_prompt(SUM_3_4)
    for mode in task.CONTENT_MODES:
        for flaw in task.SURFACE_FLAWS:
            texts.append(" " + task._apply_flaw(task._compose(spec, mode, rng), flaw, rng))
    texts += [" The sea is happy happy bright bright lovely lovely lovely.", " 18 plus 0 is 18.."]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and [tok.table[i] for i in ids] == gpt2.encode(text), text
    # text the task never writes is refused by name, not mangled
    with pytest.raises(Exception, match="outside the compact vocabulary"):
        tok.encode(" The sea is turquoise.")


def test_compact_vocabulary_reads_back_whatever_a_model_writes():
    """A model can join table tokens into words GPT-2 reads as other tokens (" looks" + "o" is " look" +
    "so" to GPT-2). spell=True reads any text made of table tokens back into table tokens with the same
    text, and notes the words it spelled; without it, such text is refused as before."""
    tok = Tokenizer.for_texts(task.vocabulary_texts())
    rng = random.Random(0)
    pieces = [i for i in range(tok.vocab_size) if i != tok.eos_id]
    texts = [tok.decode(rng.choices(pieces, k=rng.randint(1, 20))) for _ in range(300)]
    assert any(not all(i in tok.compact_id for i in tok.bpe.encode_ordinary(t)) for t in texts)  # the case exists
    for text in texts:
        ids = tok.encode(text, spell=True)
        assert tok.decode(ids) == text and tok.eos_id not in ids, text
    lookso = tok.encode(" The house" + tok.decode(tok.encode(" looks")) + "o is dark.", spell=True)
    assert tok.decode(lookso) == " The house lookso is dark." and tok.spelled[-1] == " lookso"
    with pytest.raises(Exception, match="outside the compact vocabulary"):
        tok.encode(" The house lookso is dark.")
    with pytest.raises(Exception, match="outside the compact vocabulary"):  # no table token holds a Z
        tok.encode(" Zebra", spell=True)


def test_gpt2_tokenizer_is_tiktoken_untouched():
    tok = Tokenizer()
    assert tok.table is None and tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("hello world") == [31373, 995] and tok.decode([31373, 995]) == "hello world"

"""support/data.py: the tokenizer offline, every JSONL reader on the shared real-format samples, clear errors
on malformed lines, explicit truncation, and padding."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA
from support.data import (
    GPT2_EOS, DataError, Tokenizer, Truncation, encode_example, gpt2_bpe, load_demonstrations, load_preferences,
    load_prompts, pad_batch,
)


def test_tokenizer_is_gpt2_offline():
    tok = gpt2_bpe()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.n_vocab == 50257 and tok.eot_token == GPT2_EOS


def test_missing_tokenizer_files_give_one_line():
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "/nonexistent/cache"}
    r = subprocess.run([sys.executable, "-c", "from support import data; data.gpt2_bpe()"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "TIKTOKEN_CACHE_DIR=/nonexistent/cache" in r.stderr


def test_demonstrations_and_tldr():
    demos = load_demonstrations(SHARED_DATA / "demonstrations_sample.jsonl")
    assert len(demos) == 60 and all(set(d) == {"prompt", "response"} for d in demos)
    tldr = load_demonstrations(SHARED_DATA / "tldr_sample.jsonl")
    assert len(tldr) == 6
    assert tldr[0]["prompt"].startswith("SUBREDDIT: r/cooking\nTITLE: My bread never rises")
    assert tldr[0]["prompt"].endswith("\nTL;DR:") and tldr[0]["response"].startswith(" ")


def test_preference_files_give_their_chosen_answers_as_demonstrations():
    hh = load_demonstrations(SHARED_DATA / "hh_rlhf_sample.jsonl")
    pairs = load_preferences(SHARED_DATA / "hh_rlhf_sample.jsonl")
    assert [(d["prompt"], d["response"]) for d in hh] == [(p["prompt"], p["answers"][0]) for p in pairs]
    generic = load_demonstrations(SHARED_DATA / "preferences_sample.jsonl")
    assert generic[0]["response"] == load_preferences(SHARED_DATA / "preferences_sample.jsonl")[0]["answers"][0]


def test_hh_rlhf_is_split_at_the_last_shared_assistant_turn(capsys):
    pairs = load_preferences(SHARED_DATA / "hh_rlhf_sample.jsonl")
    raw = [json.loads(line) for line in (SHARED_DATA / "hh_rlhf_sample.jsonl").read_text().splitlines()]
    # line 58's chosen dialogue has a turn more than its rejected one (a "Human:" run into the assistant's
    # answer, then another "Assistant:"): not two answers to one prompt
    assert "skipped 1 line(s) with dialogues that differ before their last turn (line 58)" in capsys.readouterr().out
    del raw[57]
    assert len(pairs) == 99
    for p, r in zip(pairs, raw, strict=True):
        assert p["prompt"].endswith("\n\nAssistant:") and p["prompt"].startswith("\n\nHuman:")
        chosen, rejected = p["answers"]
        assert p["prompt"] + chosen == r["chosen"] and p["prompt"] + rejected == r["rejected"]
        assert "\n\nHuman:" not in chosen + rejected  # one prompt, two answers to it
    # the generic file was made from the same rows by the same split
    generic = load_preferences(SHARED_DATA / "preferences_sample.jsonl")
    hh = {(p["prompt"], *p["answers"]) for p in pairs}
    assert sum((g["prompt"], *g["answers"]) in hh for g in generic) == len(generic)


def test_scored_preferences_keep_their_scores_and_unicode(capsys):
    rows = load_preferences(SHARED_DATA / "preferences_scored_sample.jsonl")
    assert rows[0]["scores"] == [0.92, 0.05]
    # line 4 has an empty rejected answer: skipped, and said so with its line number
    assert len(rows) == 4 and "skipped 1 line(s) with an empty answer (line 4)" in capsys.readouterr().out
    assert any(any(ord(c) > 0xFFFF for c in "".join(r["answers"]) + r["prompt"]) for r in rows)  # the emoji


def test_tldr_comparisons_take_the_chosen_summary():
    rows = load_preferences(SHARED_DATA / "tldr_comparisons_sample.jsonl")
    assert len(rows) == 4 and all(r["prompt"].endswith("TL;DR:") for r in rows)
    assert all(r["answers"][0] != r["answers"][1] for r in rows)


def test_prompts_from_every_format():
    assert len(load_prompts(SHARED_DATA / "hh_rlhf_sample.jsonl")) == 99  # line 58 skipped (above)
    assert len(load_prompts(SHARED_DATA / "tldr_sample.jsonl")) == 6
    assert len(load_prompts(SHARED_DATA / "preferences_sample.jsonl")) == 60


@pytest.mark.parametrize("line, message", [
    (2, "malformed_preferences.jsonl:2: not valid JSON"),
    (3, "malformed_preferences.jsonl:3: missing field 'rejected'"),
    (4, "malformed_preferences.jsonl:4: field 'prompt' must be a string"),
    (6, "malformed_preferences.jsonl:6: expected a JSON object"),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    # each bad line of the shared file on its own after the valid first line (blank line 5 is skipped)
    lines = (SHARED_DATA / "malformed_preferences.jsonl").read_text().splitlines()
    path = tmp_path / "malformed_preferences.jsonl"
    path.write_text("\n".join(lines[0:1] + [""] * (line - 2) + [lines[line - 1]]) + "\n")
    with pytest.raises(DataError, match=message):
        load_preferences(path)
    with pytest.raises(DataError, match="malformed_preferences.jsonl:2: not valid JSON"):
        load_preferences(SHARED_DATA / "malformed_preferences.jsonl")


def test_missing_file_names_the_flag_that_named_it():
    with pytest.raises(DataError, match="nope.jsonl: no such data file; pass a JSONL file to --data, or --data def"):
        load_demonstrations(REPO / "nope.jsonl")
    with pytest.raises(DataError, match="to --candidates$"):  # label.py's flag; --data default means nothing there
        load_preferences(REPO / "nope.jsonl", "--candidates")


def test_truncation_is_explicit_and_counted():
    tok = Tokenizer()
    trunc = Truncation(max_prompt_tokens=4, max_answer_tokens=5)
    p, a = encode_example(tok, "one two three four five six", " a b", trunc)
    assert p == tok.encode(" three four five six") and a == tok.encode(" a b") + [GPT2_EOS]
    p, a = encode_example(tok, "hi", " a b c d e f g", trunc)
    assert a == tok.encode(" a b c d e")  # cut: no EOS, a cut answer must not teach stopping
    assert (trunc.prompts_cut, trunc.answers_cut, trunc.prompts_seen, trunc.answers_seen) == (1, 1, 2, 2)
    assert "1/2 prompts cut" in trunc.report()


def test_pad_batch_both_sides():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]

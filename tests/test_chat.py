"""tools/chat.py: the streamed answer is GPT.generate's, the conversation is fitted into the block, and the
terminal chat behaves as a user meets it: driven through stdin of a subprocess, read from its output."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from model import GPT, GPTConfig, PolicyWithValue, RewardModel, generate
from support import task
from support.checkpoint import save_checkpoint
from support.data import Tokenizer
from tools.chat import conversation_ids, fit_turns, stream_answer

BANANA = "What color is a banana?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder laid out as pipeline.sh lays it out (sft/, ppo/, reward/ with a ckpt.pt each), holding
    untrained one-layer models with the task's tokenizer: made in a blink, and their answers are noise,
    which is all these tests need. Trained, as the stages record it, on the built-in task (--data default)."""
    out = tmp_path_factory.mktemp("run")
    tok = Tokenizer.for_texts(task.vocabulary_texts())
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    reward_model = RewardModel(config)
    torch.nn.init.normal_(reward_model.reward_head.proj.weight)  # a zero head would score every answer 0
    for stage, model in (("sft", GPT(config)), ("ppo", PolicyWithValue(config)), ("reward", reward_model)):
        save_checkpoint(out / stage / "ckpt.pt", model, stage, 0, {"data": "default"}, tok.state())
    return out


@pytest.fixture(scope="module")
def dialogue_ckpt(tmp_path_factory):
    """An untrained one-layer sft model with GPT-2's vocabulary, recorded as trained on a file of dialogues: a
    model that keeps the conversation. Block size 64, so that a few turns overflow it."""
    path = tmp_path_factory.mktemp("dialogue") / "sft" / "ckpt.pt"
    tok = Tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(path, model, "sft", 0, {"data": "hh_rlhf.jsonl"}, tok.state())
    return path


def chat(*flags, stdin=""):
    """Run tools/chat.py with flags and stdin (not a terminal); (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "tools/chat.py", *map(str, flags)], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def replies(stdout):
    """The output after each echoed message, one string per message."""
    return stdout.split("\nyou> ")[1:]


def test_stream_answer_is_generate():
    """The chat's token-by-token loop samples exactly what GPT.generate samples for one prompt."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=48, vocab_size=101, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 100, (13,)).tolist()
    for temperature, top_k, top_p in ((1.0, None, None), (0.8, 20, 0.9), (0, None, None)):
        tokens, _, answer_mask = generate(model, [prompt], 20, eos_id=100, temperature=temperature, top_k=top_k,
                                                top_p=top_p, seed=5)
        expected = [t for t, keep in zip(tokens[0].tolist(), answer_mask[0].tolist()) if keep]
        streamed = list(stream_answer(model, prompt, 20, 100, temperature, top_k, top_p,
                                      torch.Generator().manual_seed(5)))
        assert streamed == expected


def test_fit_turns_drops_the_oldest_turns():
    tok = Tokenizer.for_texts(task.vocabulary_texts())
    answer = tok.encode(" A banana is yellow.")
    turns = [(BANANA, answer), ("What is 3 plus 4?", answer), ("What sound does a cow make?", answer)]
    full = conversation_ids(tok, turns, BANANA)
    assert tok.decode(full) == ("Human: What color is a banana?\n\nAssistant: A banana is yellow.\n\nHuman: What is 3 "
                                "plus 4?\n\nAssistant: A banana is yellow.\n\nHuman: What sound does a cow make?\n\n"
                                "Assistant: A banana is yellow.\n\nHuman: What color is a banana?\n\nAssistant:")
    assert full == tok.encode(tok.decode(full))  # the pieces are the tokens of the whole text
    assert fit_turns(tok, turns, BANANA, len(full)) == (full, 0)
    ids, dropped = fit_turns(tok, turns, BANANA, len(full) - 1)
    assert dropped == 1 and ids == conversation_ids(tok, turns[1:], BANANA)
    alone = conversation_ids(tok, [], BANANA)
    assert fit_turns(tok, turns, BANANA, len(alone)) == (alone, 3)
    assert fit_turns(tok, turns, BANANA, len(alone) - 1) == (None, 3)


def test_task_models_take_one_question_at_a_time(run_dir):
    """The task's models were trained on single questions: each message starts a new conversation (said once,
    at the start), so every question of the task gets its gold score and the same question, greedily, the same
    answer; a missing gold score says why; a word outside the compact vocabulary is one line and the chat goes
    on. Stage folders stand for their ckpt.pt, and the reward model beside them is found."""
    script = [BANANA, "What is 3 plus 4?", "What color is a plum and a banana?", "Thanks, robot!", BANANA]
    code, out, err = chat("--checkpoint", f"{run_dir / 'sft'},{run_dir / 'ppo'}", "--max_new_tokens", 16,
                          "--temperature", 0, stdin="\n".join(script) + "\n")
    assert code == 0, err
    assert out.count("each message starts a new conversation") == 1
    assert "sft, ppo: trained on the built-in task's questions one at a time, so each message starts a new " \
           "conversation\n" in out
    assert f"reward: {run_dir / 'reward' / 'ckpt.pt'} scores the answers of sft, ppo\n" in out
    assert "commands: /quit leaves\n" in out  # nothing for /reset to forget
    banana, sum_, plum, thanks, banana_again = replies(out)
    for reply in (banana, sum_, banana_again):
        answers = [line for line in reply.splitlines() if line.startswith(("sft>", "ppo>"))]
        assert len(answers) == 2 and all("reward " in a and "gold " in a for a in answers), reply
    assert plum.count("[") == 2 and plum.count("no gold: not a question of the built-in task]") == 2, plum
    assert banana_again.rstrip("\n") == banana  # greedy: the same prompt, the same answers
    assert thanks.splitlines()[1:] == [
        f"{name}> (this model knows only the built-in task's words, not 'Thanks robot'; try e.g. 'What color is a "
        "banana?')" for name in ("sft", "ppo")]  # no conversation to go on with
    assert "dropped" not in out


def test_a_model_that_holds_a_conversation_keeps_it(dialogue_ckpt):
    """A model trained on dialogues keeps the conversation until /reset; gold only on a question that starts
    one, and the answers after it say why there is none; the oldest turn is dropped when the block is full,
    and the chat says so; /quit ends it with exit code 0."""
    script = [BANANA, BANANA, "What is 3 plus 4?", "/reset", BANANA, "/quit", BANANA]
    code, out, err = chat("--checkpoint", dialogue_ckpt, "--max_new_tokens", 16, "--reward", "none",
                          stdin="\n".join(script) + "\n")
    assert code == 0, err
    assert "one at a time" not in out and "commands: /reset forgets the conversation, /quit leaves\n" in out
    said = replies(out)
    assert len(said) == 6  # nothing after /quit is read
    first, again, sum_, reset, after_reset, _ = said
    for reply in (first, again, sum_, after_reset):
        assert "\nsft>" in reply
    assert "gold" in first and "gold" in after_reset and "no gold" not in first + after_reset
    assert "no gold: the judge scores a question alone, not a conversation (/reset)]" in again
    assert "reward" not in first
    assert "dropped the oldest 1 turn(s)" in sum_  # 3 turns of 12 + 16 tokens do not fit in 64 - 16
    assert "(conversation forgotten)" in reset


def test_side_by_side_scores_each_answer(run_dir):
    """One message, one answer per checkpoint, each with its reward (the reward model beside them,
    found by itself) and gold score; the end of stdin ends the chat with exit code 0."""
    checkpoints = f"{run_dir / 'sft' / 'ckpt.pt'},{run_dir / 'ppo' / 'ckpt.pt'}"
    code, out, err = chat("--checkpoint", checkpoints, "--max_new_tokens", 8, stdin=BANANA + "\n")
    assert code == 0, err
    assert f"reward: {run_dir / 'reward' / 'ckpt.pt'} scores the answers of sft, ppo\n" in out
    (reply,) = replies(out)
    answers = [line for line in reply.splitlines() if line.startswith(("sft>", "ppo>"))]
    assert [a[:4] for a in answers] == ["sft>", "ppo>"]
    for answer in answers:
        scores = answer.rsplit("   [", 1)[1]
        assert "reward " in scores and "gold " in scores


def test_reward_checkpoint_as_policy_is_one_error_line(run_dir):
    code, out, err = chat("--checkpoint", run_dir / "reward" / "ckpt.pt", stdin=BANANA + "\n")
    assert code == 2
    assert err.splitlines() == [f"error: {run_dir / 'reward' / 'ckpt.pt'} is a 'reward' checkpoint, but a 'sft' "
                                "(from train_sft.py) or 'ppo' (from train_ppo.py) checkpoint is needed here"]


def test_a_folder_without_a_checkpoint_is_one_error_line(tmp_path):
    code, out, err = chat("--checkpoint", tmp_path, stdin=BANANA + "\n")
    assert code == 2
    assert err.splitlines() == [f"error: {tmp_path / 'ckpt.pt'}: no such checkpoint; train one with train_sft.py or "
                                "train_ppo.py, or fix the path"]

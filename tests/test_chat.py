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
    which is all these tests need. Block size 64, so that a few turns overflow it."""
    out = tmp_path_factory.mktemp("run")
    tok = Tokenizer.for_texts(task.vocabulary_texts())
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    reward_model = RewardModel(config)
    torch.nn.init.normal_(reward_model.reward_head.proj.weight)  # a zero head would score every answer 0
    for stage, model in (("sft", GPT(config)), ("ppo", PolicyWithValue(config)), ("reward", reward_model)):
        save_checkpoint(out / stage / "ckpt.pt", model, stage, 0, {}, tok.state())
    return out


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


def test_scripted_conversation(run_dir):
    """Answers each message; gold only on a one-turn prompt of the task (so it shows what /reset
    forgot); drops the oldest turn when the block is full, and says so; a word outside the compact
    vocabulary is one line and the chat goes on; /quit ends it with exit code 0."""
    script = [BANANA, BANANA, "Thanks, robot!", "What is 3 plus 4?", "/reset", BANANA, "/quit", BANANA]
    code, out, err = chat("--checkpoint", run_dir / "sft" / "ckpt.pt", "--max_new_tokens", 16, "--reward", "none",
                          stdin="\n".join(script) + "\n")
    assert code == 0, err
    said = replies(out)
    assert len(said) == 7  # nothing after /quit is read
    first, again, thanks, sum_, reset, after_reset, _ = said
    for reply in (first, again, sum_, after_reset):
        assert "\nsft>" in reply
    assert "gold" in first and "gold" not in again and "gold" in after_reset
    assert "reward" not in first
    assert thanks.splitlines()[1:] == [
        "sft> (this model knows only the built-in task's words, not 'Thanks, robot!'; try e.g. 'What color is a "
        "banana?'; the conversation goes on)"]
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

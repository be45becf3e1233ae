"""Bad input, met the way a user meets it: each script run as a subprocess with real flags on small files
written here. Every case must end with exit code 2 and exactly one `error:` line that names the file
(and line, where there is one) or the flag, with no traceback, and before any long work starts.

The library-level checks (sampling settings, the weight loader) follow at the end."""

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA

from model import GPT, GPTConfig, check_sampling, generate, sample_next_token
from support.errors import LoadError
from support.gpt2 import load_gpt2_weights


def run_script(script, *args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def assert_one_error(code, output, *expected):
    assert code == 2, f"exit code {code}, expected 2:\n{output}"
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny SFT checkpoint (the task's compact vocabulary) and a reward model from it, made in-process."""
    import train_reward
    import train_sft

    out = tmp_path_factory.mktemp("ckpts")
    train_sft.main(train_sft.Config(out_dir=str(out / "sft"), n_train=64, n_eval=8, eval_prompts=0, batch_size=8,
                                    max_iters=2, eval_interval=2, warmup_iters=1))
    train_reward.main(train_reward.Config(out_dir=str(out / "reward"), sft=str(out / "sft" / "ckpt.pt"), n_train=16,
                                          n_eval=4, k=2, batch_size=4, max_iters=1, eval_interval=1))
    return out


def jsonl(path, *lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


# words of the built-in task, so that the tiny checkpoints' compact vocabulary can read them
GOOD_PAIR = json.dumps({"prompt": "Human: What color is a banana?\n\nAssistant:", "chosen": " A banana is yellow.",
                        "rejected": " A banana is red."})


# -----------------------------------------------------------------------------
# Data files: broken lines stop the run with file:line


@pytest.mark.parametrize("bad_line, message", [
    (b'{"prompt": "hi", "chosen": "caf\xe9", "rejected": "x"}', "bad.jsonl:2: not UTF-8"),
    (b'{"prompt": "hi", "chosen": ', "bad.jsonl:2: not valid JSON"),
    (b'["prompt", "chosen"]', "bad.jsonl:2: expected a JSON object"),
    (b'{"prompt": "hi", "chosen": "a"}', "bad.jsonl:2: missing field 'rejected'"),
    (b'{"prompt": 3, "chosen": "a", "rejected": "b"}', "bad.jsonl:2: field 'prompt' must be a string"),
    (b'{"prompt": "hi", "chosen": "a", "rejected": "b", "chosen_score": NaN, "rejected_score": 0}',
     "bad.jsonl:2: field 'chosen_score' is nan"),
    (b'{"prompt": "hi", "chosen": "a", "rejected": "b", "chosen_score": 1, "rejected_score": -Infinity}',
     "bad.jsonl:2: field 'rejected_score' is -inf"),
    (b'{"prompt": "hi", "chosen": "a", "rejected": "b", "chosen_score": 1}', "bad.jsonl:2: give both"),
    (b'{"prompt": "hi", "answers": "a b"}', "bad.jsonl:2: 'answers' must be a list"),
    (b'{"info": {"subreddit": "a", "title": "b", "post": "c"}, "summaries": [{"text": "x"}, {"text": "y"}], '
     b'"choice": 2}', "bad.jsonl:2: a TL;DR comparison needs"),
    (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}',
     "bad.jsonl:2: 'chosen' and 'rejected' do not share a prompt"),
])
def test_broken_line_in_preferences(tmp_path, ckpts, bad_line, message):
    data = jsonl(tmp_path / "bad.jsonl", GOOD_PAIR, bad_line)
    code, out = run_script("train_reward.py", "--data", data, "--sft", ckpts / "sft" / "ckpt.pt",
                           "--out_dir", tmp_path / "rm")
    assert_one_error(code, out, message)


@pytest.mark.parametrize("script", ["train_sft.py", "train_reward.py", "train_ppo.py"])
def test_missing_and_empty_data_files(tmp_path, ckpts, script):
    args = {"train_sft.py": [], "train_reward.py": ["--sft", ckpts / "sft" / "ckpt.pt"],
            "train_ppo.py": ["--sft", ckpts / "sft" / "ckpt.pt", "--reward", ckpts / "reward" / "ckpt.pt"]}[script]
    code, out = run_script(script, "--data", tmp_path / "nope.jsonl", "--out_dir", tmp_path / "o", *args)
    assert_one_error(code, out, "nope.jsonl: no such data file; pass a JSONL file to --data, or --data default")
    empty = jsonl(tmp_path / "empty.jsonl", "", "  ")
    code, out = run_script(script, "--data", empty, "--out_dir", tmp_path / "o", *args)
    assert_one_error(code, out, "empty.jsonl: the file holds no records")


def test_rows_that_cannot_teach_are_skipped_with_their_lines(tmp_path, capsys):
    """Empty answers and HH dialogues that part before their last turn: skipped and counted, not used."""
    from support.data import load_demonstrations, load_preferences

    diverging = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y"})
    empty_answer = json.dumps({"prompt": "Human: hi\n\nAssistant:", "chosen": " Hi.", "rejected": "  "})
    extra_assistant_turn = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: more",
                                       "rejected": "\n\nHuman: a\n\nAssistant: c"})
    path = jsonl(tmp_path / "mixed.jsonl", GOOD_PAIR, diverging, empty_answer, GOOD_PAIR, extra_assistant_turn)
    rows = load_preferences(path)
    out = capsys.readouterr().out
    assert len(rows) == 2
    assert "skipped 2 line(s) with dialogues that differ before their last turn (line 2, 5)" in out
    assert "skipped 1 line(s) with an empty answer (line 3)" in out
    demos = jsonl(tmp_path / "demos.jsonl", json.dumps({"prompt": "", "response": " x"}),
                  json.dumps({"prompt": "p", "response": " x"}))
    assert len(load_demonstrations(demos)) == 1 and "empty prompt (line 1)" in capsys.readouterr().out
    with pytest.raises(LoadError, match="no usable comparisons"):
        load_preferences(jsonl(tmp_path / "none.jsonl", empty_answer))


def test_margin_without_scores_no_comparison_to_train_on_and_a_folder_for_a_checkpoint(tmp_path, ckpts):
    data = jsonl(tmp_path / "pairs.jsonl", *[GOOD_PAIR] * 40)
    sft = ckpts / "sft" / "ckpt.pt"
    code, out = run_script("train_reward.py", "--data", data, "--sft", sft, "--margin_coef", 1,
                           "--out_dir", tmp_path / "a")
    assert_one_error(code, out, "pairs.jsonl: --margin_coef needs a score for every answer")
    code, out = run_script("train_reward.py", "--data", jsonl(tmp_path / "one.jsonl", GOOD_PAIR), "--sft", sft,
                           "--out_dir", tmp_path / "b")
    assert_one_error(code, out, "one.jsonl: no comparison to train on (1 held out for the eval)")
    code, out = run_script("train_reward.py", "--data", data, "--sft", ckpts / "sft", "--out_dir", tmp_path / "c")
    assert_one_error(code, out, f"{ckpts / 'sft'} is a folder; pass the checkpoint in it, {sft}")


def test_text_outside_the_compact_vocabulary(tmp_path, ckpts):
    """A task model (compact vocabulary) cannot read arbitrary text: the error says so, with the fix."""
    data = jsonl(tmp_path / "prompts.jsonl", *[json.dumps({"prompt": f"Human: what is a zebra {i}?\n\nAssistant:"})
                                               for i in range(40)])
    code, out = run_script("train_ppo.py", "--data", data, "--sft", ckpts / "sft" / "ckpt.pt", "--reward",
                           ckpts / "reward" / "ckpt.pt", "--out_dir", tmp_path / "o")
    assert_one_error(code, out, "outside the compact vocabulary", "--vocab gpt2")


# -----------------------------------------------------------------------------
# Checkpoints: the wrong stage, a missing or broken file


def test_wrong_missing_and_broken_checkpoints(tmp_path, ckpts):
    sft, reward = ckpts / "sft" / "ckpt.pt", ckpts / "reward" / "ckpt.pt"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 not really")
    cases = [
        (("train_reward.py", "--sft", reward), [str(reward), "is a 'reward' checkpoint, but a 'sft'"]),
        (("train_ppo.py", "--sft", sft, "--reward", sft), [str(sft), "is a 'sft' checkpoint, but a 'reward'"]),
        (("train_ppo.py", "--sft", tmp_path / "none.pt", "--reward", reward), ["none.pt: no such checkpoint",
                                                                               "train_sft.py or train_ppo.py,"]),
        (("train_reward.py", "--sft", junk), ["junk.pt: cannot be read as a checkpoint"]),
        (("train_sft.py", "--init", reward), ["is a 'reward' checkpoint"]),
        (("train_sft.py", "--resume"), ["ckpt.pt: no such checkpoint"]),
    ]
    for (script, *args), expected in cases:
        code, out = run_script(script, *args, "--out_dir", tmp_path / "o")
        assert_one_error(code, out, *expected)


# -----------------------------------------------------------------------------
# Settings: every flag is checked before any work starts


@pytest.mark.parametrize("script, args, expected", [
    ("train_ppo.py", ["--temperature", "0"], "--temperature must be > 0"),
    ("train_ppo.py", ["--temperature", "-1"], "--temperature must be > 0"),
    ("train_ppo.py", ["--logprob_impl", "bogus"], "--logprob_impl 'bogus'"),
    ("train_ppo.py", ["--minibatch_size", "0"], "--minibatch_size must be >= 1, got 0"),
    ("train_ppo.py", ["--minibatch_size", "65"], "--minibatch_size 65 is larger than a rollout"),
    ("train_ppo.py", ["--clip_eps", "1.5"], "--clip_eps must be > 0 and < 1, got 1.5"),
    ("train_ppo.py", ["--max_new_tokens", "200"], "exceeds the model's block_size 128"),
    ("train_sft.py", ["--eval_interval", "0"], "--eval_interval must be >= 1, got 0"),
    ("train_sft.py", ["--batch_size", "-3"], "--batch_size must be >= 1, got -3"),
    ("train_sft.py", ["--vocab", "bogus"], "--vocab 'bogus'"),
    ("train_sft.py", ["--vocab", "task", "--data", "x.jsonl"], "--vocab task only fits --data default"),
    ("train_sft.py", ["--attn_impl", "flash"], "--attn_impl 'flash'"),
    ("train_sft.py", ["--device", "cuda"], "no CUDA device"),
    ("train_sft.py", ["--device", "tpu"], "--device 'tpu'"),
    ("train_sft.py", ["--preset", "gpt5"], "--preset 'gpt5': use one of tiny, gpt2, gpt2-medium"),
    ("train_sft.py", ["--max_prompt_tokens", "100", "--max_answer_tokens", "100"],
     "exceeds the model's block_size 128"),
    ("train_sft.py", ["--init", "gpt2"], "--init gpt2 needs --weights"),
    ("train_sft.py", ["--lr", "abc"], "argument --lr: 'abc' is not a number"),
    ("train_reward.py", ["--k", "1"], "--k must be >= 2, got 1"),
    ("train_reward.py", ["--candidates", "humans"], "--candidates 'humans'"),
    ("train_reward.py", ["--label_noise", "-1"], "--label_noise must be >= 0, got -1.0"),
])
def test_bad_settings(tmp_path, ckpts, script, args, expected):
    stage_args = {"train_sft.py": [], "train_reward.py": ["--sft", ckpts / "sft" / "ckpt.pt"],
                  "train_ppo.py": ["--sft", ckpts / "sft" / "ckpt.pt", "--reward", ckpts / "reward" / "ckpt.pt"]}
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has a CUDA device")
    code, out = run_script(script, *stage_args[script], "--out_dir", tmp_path / "o", *args)
    assert_one_error(code, out, expected)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.parametrize("script, flags, expected", [
    ("train_reward.py", ["--policy", "{sft},,{sft}"], "none of them empty"),
    ("train_reward.py", ["--policy", "{reward}"], "is a 'reward' checkpoint, but a 'sft'"),
    ("train_reward.py", ["--init", "{sft}"], "is a 'sft' checkpoint, but a 'reward'"),
    ("train_reward.py", ["--extra_data", "{shared}/malformed_preferences.jsonl"], "malformed_preferences.jsonl:2:"),
    ("train_reward.py", ["--extra_data", "{tmp}/missing.jsonl"], "missing.jsonl: no such data file; pass a JSONL file "
     "to --extra_data"),
    ("train_ppo.py", ["--policy", "{reward}"], "is a 'reward' checkpoint, but a 'sft'"),
])
def test_a_later_round_inputs_fail_before_any_sampling(tmp_path, ckpts, script, flags, expected):
    """The checkpoints and files a later RLHF round names are read first: a wrong one is one line at
    once, not after minutes of sampling answers (no comparisons.jsonl, no checkpoint written)."""
    paths = {"sft": ckpts / "sft" / "ckpt.pt", "reward": ckpts / "reward" / "ckpt.pt", "shared": SHARED_DATA,
             "tmp": tmp_path}
    stage_args = ["--sft", paths["sft"]] + (["--reward", paths["reward"]] if script == "train_ppo.py" else [])
    code, out = run_script(script, *stage_args, "--out_dir", tmp_path / "o", *[f.format(**paths) for f in flags])
    assert_one_error(code, out, expected)
    assert not (tmp_path / "o" / "comparisons.jsonl").exists() and not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.parametrize("script", ["train_sft.py", "train_reward.py", "train_ppo.py"])
def test_out_dir_that_is_a_file(tmp_path, script):
    (tmp_path / "taken").write_text("a file, not a folder")
    code, out = run_script(script, "--out_dir", tmp_path / "taken" / "sub")
    assert_one_error(code, out, "--out_dir", "taken exists and is not a folder")


# -----------------------------------------------------------------------------
# Weight folders (--init gpt2 --weights DIR)


def write_hf_folder(folder, config=None, n_embd=32, vocab=50257):
    """A real-format GPT-2 folder (config.json + model.safetensors) with random weights, Conv1D layout."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config or {"model_type": "gpt2", "n_positions": 64, "vocab_size": vocab, "n_layer": 1, "n_head": 2,
                        "n_embd": n_embd}
    (folder / "config.json").write_text(json.dumps(config))
    model = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=1, n_head=2, n_embd=n_embd))
    tensors = {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v).contiguous()
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return folder


def test_weight_folders(tmp_path):
    good = write_hf_folder(tmp_path / "good")
    assert load_gpt2_weights(good).config.n_embd == 32

    def bad(name, edit):
        folder = write_hf_folder(tmp_path / name)
        edit(folder)
        return folder

    raw = (good / "model.safetensors").read_bytes()
    cases = [
        (bad("cut", lambda f: (f / "model.safetensors").write_bytes(raw[: len(raw) // 2])),
         "model.safetensors: not a complete"),
        (bad("cut_header", lambda f: (f / "model.safetensors").write_bytes(raw[:20])),
         "model.safetensors: not a complete"),
        (bad("notjson", lambda f: (f / "config.json").write_text("{n_layer: 1")), "config.json: not valid JSON"),
        (bad("nofield", lambda f: (f / "config.json").write_text('{"n_layer": 1}')), "field 'n_positions' is missing"),
        (bad("inner", lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((f / "config.json").read_text()), "n_inner": 7}))), "n_inner=7 is not supported"),
        (bad("relu", lambda f: (f / "config.json").write_text(json.dumps(
            {**json.loads((f / "config.json").read_text()), "activation_function": "relu"}))),
         "activation_function=relu"),
        (bad("noweights", lambda f: (f / "model.safetensors").unlink()), "no model.safetensors or pytorch_model.bin"),
    ]
    for folder, message in cases:
        code, out = run_script("train_sft.py", "--init", "gpt2", "--weights", folder, "--out_dir", tmp_path / "o",
                               "--data", SHARED_DATA / "demonstrations_sample.jsonl")
        assert_one_error(code, out, str(folder), message)
    # a .bin cut short, and a vocabulary too small for the GPT-2 tokenizer
    binf = bad("bin", lambda f: (f / "model.safetensors").unlink())
    gpt = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    torch.save(gpt.state_dict(), binf / "pytorch_model.bin")
    (binf / "pytorch_model.bin").write_bytes((binf / "pytorch_model.bin").read_bytes()[:5000])
    small = write_hf_folder(tmp_path / "small", vocab=300)
    for folder, message in ((binf, "pytorch_model.bin: cannot be read"), (small, "300 token embeddings")):
        code, out = run_script("train_sft.py", "--init", "gpt2", "--weights", folder, "--out_dir", tmp_path / "o",
                               "--data", SHARED_DATA / "demonstrations_sample.jsonl")
        assert_one_error(code, out, str(folder), message)


# -----------------------------------------------------------------------------
# Library level: sampling settings


def test_sampling_settings_are_checked():
    for kwargs, message in ((dict(temperature=-0.5), "temperature must be"),
                            (dict(temperature=math.nan), "temperature"), (dict(top_k=0), "top_k must be"),
                            (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in")):
        with pytest.raises(ValueError, match=message):
            check_sampling(**{"temperature": 1.0, **kwargs})
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=1, n_embd=32)).eval()
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1, 2], []], 3, eos_id=10)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[1, 2]], 3, eos_id=10, top_k=0)


def test_tiny_temperature_is_greedy_and_finite():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1e4], [5.0, -2.0, 4.9, 0.0]])
    for temperature in (1e-45, 1e-30, 1e-6):
        assert sample_next_token(logits, temperature).tolist() == [1, 0]
    assert sample_next_token(logits, 0).tolist() == [1, 0]  # 0 is greedy, as documented
    masked = torch.tensor([[float("-inf"), 0.0, float("-inf")]])  # a masked vocabulary
    assert sample_next_token(masked, 0.5, top_p=0.9).tolist() == [1]


def test_each_flag_shows_its_limits_in_help_and_triton_needs_a_gpu(tmp_path):
    """A flag's limits stand beside it (flag(..., min=1)): --help says them, and a value outside is refused by
    name before any work; --attn_impl triton on a CPU without the interpreter is one line too."""
    help_text = subprocess.run([sys.executable, str(REPO / "train_ppo.py"), "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"}).stdout
    assert "[>= 1]" in help_text and "[> 0 and < 1]" in help_text and "[one of auto, triton, torch]" in help_text
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: there --attn_impl triton runs, the error cannot arise")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, str(REPO / "train_sft.py"), "--attn_impl", "triton", "--out_dir", tmp_path],
                       env=env, capture_output=True, text=True, timeout=300)
    assert_one_error(r.returncode, r.stdout + r.stderr, "--attn_impl triton needs a CUDA device")


def test_non_finite_flags_and_a_diverging_run(tmp_path):
    for flag in ("nan", "inf"):
        code, out = run_script("train_sft.py", "--lr", flag, "--out_dir", tmp_path / "o")
        assert_one_error(code, out, f"argument --lr: '{flag}' is not a finite number")
    code, out = run_script("train_sft.py", "--seed", "-1", "--out_dir", tmp_path / "o")
    assert_one_error(code, out, "--seed must be >= 0 and <= 2147483647, got -1")
    # a learning rate that makes the loss blow up stops at the next log line, not 1000 steps later
    code, out = run_script("train_sft.py", "--lr", "1e30", "--grad_clip", "0", "--n_train", "64", "--n_eval", "8",
                           "--eval_prompts", "0", "--batch_size", "8", "--max_iters", "20", "--eval_interval", "20",
                           "--out_dir", tmp_path / "o")
    assert_one_error(code, out, "the training loss at step 10 is nan", "lower --lr")

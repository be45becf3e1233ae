"""What the stage scripts import beside model.py: the built-in task (task.py), data formats and the tokenizer
(data.py), flags, logs and the optimizer (training.py), checkpoints (checkpoint.py), GPT-2's weights (gpt2.py),
sampling many answers (sampling.py), the reward model's comparisons (comparisons.py), a PPO run's loading and
logging (ppo_run.py), and the speed-ups that compute the same numbers with less work (speedups.py). The RLHF
maths is in the stage scripts themselves."""

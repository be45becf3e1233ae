"""What the stage scripts import beside model.py: data, the built-in task, flags and logs, checkpoints, GPT-2's
weights, and the speed-ups. The RLHF maths is in the stage scripts themselves."""

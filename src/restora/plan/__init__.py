"""The memory planner: what a setting holds at its peak (memory.py), and which precision or micro-batch fits a
budget (choice.py). Post LoRA Restoration picks the training base k by training memory and the inference base
l > k by inference memory; the planner answers both from a model's config alone."""

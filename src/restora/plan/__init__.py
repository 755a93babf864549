"""The memory planner: a model's shape and storage bytes (shape.py), what a setting holds at its peak
(memory.py), which precision or micro-batch fits a budget (choice.py), and sizes as written and printed
(sizes.py). Post LoRA Restoration picks the training base k by training memory and the inference base l > k
by inference memory; the planner answers both from a model's config alone."""

"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Rules this module keeps: a pure function of the step (0-based, the optimizer step about to be
taken), so a resumed run needs nothing but the step; warmup starts at lr/warmup (never 0, so
step 0 already moves); at and after `total_steps` it stays at `min_lr`.
Tests: tests/integration/test_train_job.py::test_schedule.
"""
import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)

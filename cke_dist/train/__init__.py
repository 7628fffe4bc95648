"""The training job: its config (config.py), data (data.py), optimizers (optim.py), LR schedule
(schedule.py) and the loop that runs them over any dp x pp x tp grid (loop.py)."""

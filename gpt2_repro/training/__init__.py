"""The training loop's parts: the accelerator, optimizers and LR schedules, one optimizer step, stop requests and
divergence, the periodic evaluation, the logs, and the memory plan of a run."""

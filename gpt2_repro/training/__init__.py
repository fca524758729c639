"""Training components: the accelerator, optimizers, one optimizer step, stopping, tracking, the memory plan."""

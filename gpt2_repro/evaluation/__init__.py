"""Measuring a model: loading one, validation loss and HellaSwag (the kernels both evaluate_gpt2.py and training
use), and the reports (tables, plots, model-card results)."""

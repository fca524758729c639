"""The public datasets and published results this project reproduces, declared once for every module.

Constants only (no imports), so the lowest layers can name a dataset without importing the Hub or a tokenizer.
"""

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIGS = {FINEWEB_EDU: "sample-10BT"}  # the config used when none is given

HELLASWAG_HUB_ID = "Rowan/hellaswag"  # Hub copy; its parquet conversion loads without the dataset script
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_SIZE = 10042

# build-nanogpt's validation budget: 20 steps of 64 x 1024 tokens on 8 GPUs = 10,485,760 tokens.
BUILD_NANOGPT_VAL_TOKENS = 20 * 64 * 1024 * 8

# Published figures: OpenAI's GPT-2 124M on the FineWeb-Edu sample-10BT val shard (build-nanogpt's play.ipynb) and
# on HellaSwag with build-nanogpt's scoring (its hellaswag.py); GPT-3 124M's HellaSwag from the GPT-3 paper.
GPT2_124M = {"val_loss": 3.2924, "hellaswag_acc_norm": 0.2955, "hellaswag_acc": 0.2859}
GPT3_124M = {"hellaswag_acc_norm": 0.337}

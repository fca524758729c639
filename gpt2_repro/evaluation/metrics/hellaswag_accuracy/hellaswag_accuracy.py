"""HellaSwag accuracy from per-ending language-model losses: `acc` and `acc_norm`, as GPT-2 reproductions count.

Kept in the repository so `evaluate.load("metrics/hellaswag_accuracy")` works offline (evaluate fetches named
metrics from the Hub). evaluate reads this file's imports to check dependencies: keep one import per line.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Zero-shot multiple-choice accuracy for HellaSwag (or any task with a fixed number of endings). For each example,
every ending is scored by the cross-entropy of its tokens given the context:
- `acc`: the ending with the lowest summed loss wins;
- `acc_norm`: the ending with the lowest average loss per token wins (build-nanogpt / llm.c call this acc_norm;
  OpenAI's GPT-2 124M scores 0.2955 on the 10,042 validation examples).
Ties go to the first ending, as with argmin.
"""

_KWARGS_DESCRIPTION = """
Args:
    ending_losses (list of list of float): per example, the summed cross-entropy (nats) of each ending's tokens.
    ending_lengths (list of list of int): per example, the number of tokens of each ending (all > 0).
    references (list of int): the index of the correct ending.
Returns:
    acc (float): fraction of examples whose lowest summed loss is the correct ending.
    acc_norm (float): fraction of examples whose lowest per-token loss is the correct ending.
    n (int): number of examples.
Examples:
    >>> metric = evaluate.load("metrics/hellaswag_accuracy")
    >>> metric.compute(ending_losses=[[4.0, 9.0]], ending_lengths=[[1, 3]], references=[1])
    {'acc': 0.0, 'acc_norm': 1.0, 'n': 1}
"""

_CITATION = """
@inproceedings{zellers2019hellaswag,
  title={HellaSwag: Can a Machine Really Finish Your Sentence?},
  author={Zellers, Rowan and Holtzman, Ari and Bisk, Yonatan and Farhadi, Ali and Choi, Yejin},
  booktitle={Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics},
  year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HellaswagAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "ending_losses": datasets.Sequence(datasets.Value("float64")),
                    "ending_lengths": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://rowanzellers.com/hellaswag/", "https://github.com/karpathy/build-nanogpt"],
        )

    def _compute(self, ending_losses, ending_lengths, references):
        losses = np.asarray(ending_losses, dtype=np.float64)  # (N, K) summed nats per ending
        lengths = np.asarray(ending_lengths, dtype=np.float64)  # (N, K) tokens per ending
        labels = np.asarray(references, dtype=np.int64)  # (N,)
        if losses.ndim != 2 or losses.shape != lengths.shape or len(labels) != len(losses):
            raise ValueError(
                f"ending_losses {losses.shape}, ending_lengths {lengths.shape} and references ({len(labels)},) "
                "must describe the same examples with the same number of endings each."
            )
        if len(labels) == 0:
            raise ValueError("No examples to score: pass at least one.")
        if (lengths <= 0).any():
            raise ValueError("Every ending needs at least one token (ending_lengths must be > 0).")
        if ((labels < 0) | (labels >= losses.shape[1])).any():
            raise ValueError(f"references must be ending indices in [0, {losses.shape[1]}).")
        acc = float(np.mean(losses.argmin(axis=1) == labels))
        acc_norm = float(np.mean((losses / lengths).argmin(axis=1) == labels))
        return {"acc": acc, "acc_norm": acc_norm, "n": len(labels)}

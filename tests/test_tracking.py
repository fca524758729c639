"""tracking.py: metrics.jsonl kept to the steps a resume keeps; the trackers' names."""

import json

from gpt2_repro.tracking import truncate_metrics


def test_truncate_metrics_drops_redone_steps_and_half_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"step": 4, "val_loss": 7.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    truncate_metrics(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in rows if r["step"] <= 4]


def test_trackers_get_the_trainers_names():
    from gpt2_repro.tracking import TRACKER_NAMES

    assert TRACKER_NAMES["loss"] == "train/loss" and TRACKER_NAMES["lr"] == "train/learning_rate"
    assert TRACKER_NAMES["val_loss"] == "eval/loss" and TRACKER_NAMES["tokens"] == "train/num_input_tokens_seen"
    assert all(name.startswith(("train/", "eval/")) for name in TRACKER_NAMES.values())

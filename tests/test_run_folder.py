"""base/run_folder.py: metrics.jsonl kept to the steps a resume keeps; the history of attempts in run_info.json."""

import json

from gpt2_repro.base.run_folder import RunFolder, config_changes, record_attempt


def test_truncate_metrics_drops_redone_steps_and_half_lines(tmp_path):
    folder = RunFolder(tmp_path)
    path = folder.metrics
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"step": 4, "val_loss": 7.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    folder.truncate_metrics(4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in rows if r["step"] <= 4]


def test_each_attempt_is_recorded_with_what_changed():
    first_cfg = {"optim": {"max_lr": 6e-4, "max_steps": 100}, "data": {"seq_len": 1024}}
    info = {"command": ["train.py"], "git_commit": "a", "num_processes": 8, "versions": {"torch": "2.1"}}
    first = record_attempt(info, None, None, first_cfg, start_step=0, resumed_from=None)
    assert len(first["attempts"]) == 1 and first["attempts"][0]["changed"] == {}
    assert first["num_processes"] == 8  # the newest facts stay at the top level
    second_cfg = {"optim": {"max_lr": 3e-4, "max_steps": 100}, "data": {"seq_len": 1024}}
    info2 = {**info, "git_commit": "b", "num_processes": 4, "versions": {"torch": "2.2"}}
    second = record_attempt(info2, first, first_cfg, second_cfg, start_step=50, resumed_from="ck")
    assert [a["start_step"] for a in second["attempts"]] == [0, 50]
    assert second["attempts"][1]["changed"] == {
        "max_lr": [6e-4, 3e-4],
        "num_processes": [8, 4],
        "git_commit": ["a", "b"],
        "versions.torch": ["2.1", "2.2"],
    }
    assert config_changes(None, second_cfg) == {}

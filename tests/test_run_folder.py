"""run_folder.py: the history of attempts in run_info.json."""

from gpt2_repro.run_folder import config_changes, record_attempt


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

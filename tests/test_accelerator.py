"""training/accelerator.py: mixed precision and compilation follow the device and the launch config."""

from pathlib import Path

from gpt2_repro.base.config import load_config, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_auto_precision_and_compile_follow_the_device_and_the_launch_config():
    from gpt2_repro.training.accelerator import precision_and_compile

    auto = load_config(ROOT / "configs" / "gpt2_124m.yaml")
    unset = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}  # a bare `accelerate launch`
    assert precision_and_compile(auto, cuda=True, env=unset) == ("bf16", "inductor")
    assert precision_and_compile(auto, cuda=True, env={}) == ("bf16", "inductor")
    assert precision_and_compile(auto, cuda=False, env=unset) == ("no", "no")
    chosen = {"ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_DYNAMO_BACKEND": "EAGER"}  # an accelerate config
    assert precision_and_compile(auto, cuda=True, env=chosen) == ("fp16", "eager")
    explicit = parse_args(["--mixed_precision", "no", "--compile", "false"])
    assert precision_and_compile(explicit, cuda=True, env={}) == ("no", "no")
    assert precision_and_compile(parse_args(["--compile", "true"]), cuda=False, env={}) == ("no", "inductor")

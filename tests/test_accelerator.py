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


def test_gradient_checkpointing_runs_each_block_again_in_the_backward():
    """--gradient_checkpointing: train.py's call makes every block run its forward a second time during the backward
    (counted as calls into each block's first LayerNorm: the recomputation stops once it has what the backward needs),
    with the same loss and gradients; without it, once. The model's own flag, which
    run_info.json records, says which."""
    import torch

    from gpt2_repro.training.accelerator import checkpoint_activations
    from synthetic import tiny_repro

    x = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(0))
    results = {}
    for flag in ("false", "true"):
        model = tiny_repro().train()
        on = checkpoint_activations(parse_args(["--gradient_checkpointing", flag]), model)
        calls = []
        for block in model.transformer.h:
            block.ln_1.register_forward_pre_hook(lambda module, args, seen=calls: seen.append(module))
        loss = model(x[:, :-1], shift_labels=x[:, 1:]).loss
        forward_calls = len(calls)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[flag] = (on, forward_calls, len(calls) - forward_calls, loss.item(), grads)
    assert results["false"][:3] == (False, 2, 0)
    assert results["true"][:3] == (True, 2, 2)  # two blocks: once in the forward, once more in the backward
    assert results["true"][3] == results["false"][3]
    for name, grad in results["false"][4].items():
        assert torch.equal(results["true"][4][name], grad), name

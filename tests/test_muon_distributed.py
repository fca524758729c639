"""training/muon.py: Muon with the orthogonalization split among processes, against torch.optim.Muon.

The distributed tests run tests/muon_worker.py in real processes: torchrun over gloo on CPU (DDP through accelerate, as
train.py runs; FSDP2 through torch's fully_shard, which accelerate cannot start on CPUs). Two ways to compare:
- every process on the whole global batch: the gradients are then those of one process bit for bit (averaging equal
  values is exact), so the weights must equal one process's bit for bit: only the optimizer could differ;
- the global batch split among the processes (the real case): the all-reduce sums in another order than one process
  does, and those roundings, carried through 20 steps, part the runs by about 1e-6. The sharded optimizer must then
  give exactly what today's (torch.optim.Muon in every process, on the same all-reduced gradients) gives.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "muon_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SPLIT_TOLERANCE = 1e-5  # split batches, 20 steps: measured 1.4e-6 on the Muon matrices (and today's optimizer alike)


def _launch(processes: int, out: Path, *args: str) -> dict:
    """Run the worker in `processes` processes; its record (written by rank 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = (TORCHRUN if processes > 1 else [sys.executable]) + [str(WORKER), *args[:1], str(out), *args[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _max_difference(a: dict, b: dict, names=None) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in (names or a))


def _equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[n], b[n]) for n in a)


def _muon_matrices(weights: dict) -> list[str]:
    from gpt2_repro.training.optim import MUON_MATRICES

    return [n for n in weights if n.endswith(MUON_MATRICES)]


def _tiny_model(seed=0):
    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    torch.manual_seed(seed)
    return GPT2ReproForCausalLM(
        GPT2ReproConfig(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=512, tokenizer_vocab_size=512)
    )


# ------------------------------------------------------------------------------------------------ one process


@pytest.mark.parametrize(
    ("newton_schulz", "nesterov", "device"),
    [
        ("cpu_fp32", True, "cpu"),
        ("pytorch_bf16", False, "cpu"),
        pytest.param("pytorch_bf16", True, "cuda", marks=pytest.mark.gpu),
    ],
)
def test_one_process_is_torch_muon_bit_for_bit(newton_schulz, nesterov, device):
    """Without a process group, DistributedMuon is torch.optim.Muon: the same weights and state after 20 steps on the
    same gradients, with momentum and LR changed between steps, weight decay, both LR adjustments; and the state
    dicts load both ways."""
    from gpt2_repro.training import optim
    from gpt2_repro.training.muon import DistributedMuon

    saved = torch.optim._muon._zeropower_via_newtonschulz
    torch.optim._muon._zeropower_via_newtonschulz = (
        optim._newton_schulz if newton_schulz == "cpu_fp32" else optim._TORCH_NEWTON_SCHULZ
    )
    try:
        models = [_tiny_model().to(device), _tiny_model().to(device)]
        matrices = [[p for n, p in m.named_parameters() if n in optim.muon_param_names(m)] for m in models]
        hyper = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": nesterov}
        ours = DistributedMuon(
            [{"params": matrices[0][:4], "adjust_lr_fn": "match_rms_adamw"}, {"params": matrices[0][4:]}], **hyper
        )
        theirs = torch.optim.Muon(
            [{"params": matrices[1][:4], "adjust_lr_fn": "match_rms_adamw"}, {"params": matrices[1][4:]}], **hyper
        )
        for step in range(20):
            x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(step)).to(device)
            models[0](input_ids=x[:, :-1], shift_labels=x[:, 1:], return_logits=False).loss.backward()
            for mine, other in zip(*matrices, strict=True):  # the same gradients (a GPU's backward is not exact)
                other.grad = mine.grad.clone()
            for opt in (ours, theirs):
                for group in opt.param_groups:
                    group["lr"], group["momentum"] = 0.02 * (1 - step / 40), 0.85 + step / 200
                opt.step()
                opt.zero_grad(set_to_none=True)
            models[0].zero_grad(set_to_none=True)
    finally:
        torch.optim._muon._zeropower_via_newtonschulz = saved
    assert all(torch.equal(a, b) for a, b in zip(*matrices, strict=True))
    start = dict(_tiny_model().named_parameters())
    names = [n for n, _ in models[0].named_parameters() if n in optim.muon_param_names(models[0])]
    assert not any(torch.equal(p.cpu(), start[n]) for n, p in zip(names, matrices[0], strict=True))  # all moved
    state, reference = ours.state_dict(), theirs.state_dict()
    assert state["param_groups"] == reference["param_groups"]
    assert all(
        torch.equal(state["state"][i]["momentum_buffer"], reference["state"][i]["momentum_buffer"]) for i in range(8)
    )
    ours.load_state_dict(reference)  # torch.optim.Muon's checkpoint into ours, and back
    theirs.load_state_dict(ours.state_dict())


def test_owners_balance_the_work_and_shards_split_as_dtensor_does():
    from gpt2_repro.training.muon import assign_owners, newton_schulz_cost, shard_sizes

    # GPT-2 124M's 48 matrices (c_attn, attn c_proj, c_fc, mlp c_proj: (rows, cols) as nn.Linear holds them)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    costs = [newton_schulz_cost(s) for s in shapes]
    for world in (2, 3, 8):
        owners = assign_owners(costs, world)
        loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == rank) for rank in range(world)]
        assert set(owners) == set(range(world))
        assert max(loads) <= 1.1 * sum(costs) / world, (world, loads)  # within 10% of an even share
    assert assign_owners([5, 5, 5], 1) == [0, 0, 0] and assign_owners([], 4) == []
    assert assign_owners([1, 9, 4], 2) == [1, 0, 1]  # largest first to rank 0, then to the least loaded
    for length in range(0, 30):
        for n in (1, 2, 3, 4, 8):
            assert shard_sizes(length, n) == [len(c) for c in torch.arange(length).chunk(n)] + [0] * (
                n - len(torch.arange(length).chunk(n))
            ), (length, n)


# ---------------------------------------------------------------------------------------------- DDP, processes


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Records of the worker: one process (saving at step 10), two with the batch split (the sharded optimizer and
    today's), two on the whole batch (saving at step 10), and resumes of those checkpoints with the other count."""
    tmp = tmp_path_factory.mktemp("muon_ddp")
    runs = {
        "one": _launch(1, tmp / "one.pt", "accelerate", "--save_at", "10", "--save", str(tmp / "ckpt_one")),
        "two": _launch(2, tmp / "two.pt", "accelerate"),
        "two_today": _launch(2, tmp / "two_today.pt", "accelerate", "--today"),
        "two_whole": _launch(
            2, tmp / "two_whole.pt", "accelerate", "--replicate", "--save_at", "10", "--save", str(tmp / "ckpt_two")
        ),
    }
    runs["two_to_one"] = _launch(1, tmp / "two_to_one.pt", "accelerate", "--load", str(tmp / "ckpt_two"))
    runs["one_to_two"] = _launch(2, tmp / "one_to_two.pt", "accelerate", "--replicate", "--load", str(tmp / "ckpt_one"))
    return runs


@pytest.mark.slow
def test_ddp_processes_share_the_orthogonalizations_and_match_one_process(ddp_runs):
    one, two, today, whole = (ddp_runs[k] for k in ("one", "two", "two_today", "two_whole"))
    assert (one["type"], two["type"], today["type"]) == ("Muon", "DistributedMuon", "Muon")
    assert _equal(whole["weights"], one["weights"])  # the same gradients: the same weights, bit for bit
    assert _equal(two["weights"], today["weights"])  # split batch: exactly today's optimizer
    assert _max_difference(two["weights"], one["weights"], _muon_matrices(one["weights"])) <= SPLIT_TOLERANCE
    # 8 matrices x 20 steps: one process does all 160; two share them 80/80 instead of doing 160 each as today
    assert one["calls"] == [160] and two["calls"] == [80, 80] and today["calls"] == [160, 160]
    # every process holds every momentum buffer, the same
    assert all(torch.equal(a, b) for a, b in zip(*two["buffers"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(two["buffers"][0], today["buffers"][0], strict=True))


@pytest.mark.slow
def test_state_saved_by_two_processes_resumes_in_one_and_back_exactly(ddp_runs):
    """accelerate's save_state at step 10, load_state in a new run with the other process count, 10 more steps: the
    state loaded is the state saved, and the weights at step 20 are those of the run that never stopped."""
    one, whole = ddp_runs["one"], ddp_runs["two_whole"]
    for resumed, saver in ((ddp_runs["two_to_one"], whole), (ddp_runs["one_to_two"], one)):
        assert all(torch.equal(a, b) for a, b in zip(resumed["loaded"], saver["saved"], strict=True))
        assert _equal(resumed["weights"], one["weights"])
    assert (ddp_runs["two_to_one"]["type"], ddp_runs["one_to_two"]["type"]) == ("Muon", "DistributedMuon")
    assert ddp_runs["one_to_two"]["calls"] == [40, 40]  # its 10 steps, shared


# --------------------------------------------------------------------------------------------- FSDP, processes


@pytest.mark.slow
def test_fsdp_owners_gather_whole_matrices_and_match_one_process(tmp_path):
    """fully_shard over 2 gloo processes, wrapped as accelerate's FSDP2 wraps the model, Muon from build_optimizers;
    and a model whose matrices split unevenly (one process holding no row of one), with PyTorch's bf16 Newton-Schulz."""
    record = _launch(2, tmp_path / "fsdp.pt", "fsdp")
    whole, split = record["replicate"], record["split"]
    assert whole["type"] == split["type"] == "DistributedMuon"
    for model in ("gpt", "odd"):
        sharded = {n: pair[0] for n, pair in whole[model].items()}
        alone = {n: pair[1] for n, pair in whole[model].items()}
        assert _equal(sharded, alone), model  # the same gradients: one process's weights, bit for bit
        sharded = {n: pair[0] for n, pair in split[model].items()}
        alone = {n: pair[1] for n, pair in split[model].items()}
        names = _muon_matrices(alone) if model == "gpt" else None
        assert _max_difference(sharded, alone, names) <= SPLIT_TOLERANCE, model
    assert record["calls"] == [[80, 80], [80, 80]]  # each process orthogonalized half of the 8 x 20
    # torch.chunk's split of rows 7, 9, 5, 1 over two processes: the second gets no row of the last
    first = {"layers.0.weight": (4, 6), "layers.1.weight": (5, 7), "layers.2.weight": (3, 9), "head.weight": (1, 5)}
    second = {"layers.0.weight": (3, 6), "layers.1.weight": (4, 7), "layers.2.weight": (2, 9), "head.weight": (0, 5)}
    assert record["shards"] == [first, second]

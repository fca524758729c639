"""Every launch the multi-process guard must tell apart, run for real on this machine (CPU): what each process's
environment holds and what accelerate's Accelerator makes of it (bench/cluster/probe_env.py), and the verdict of the
trainer's guard (gpt2_repro/base/launch.py). Exits 1 if the guard misjudges a launch.

    python bench/cluster/launch_matrix.py            # a table on stdout; --json FILE keeps the raw records
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests")]

from gpt2_repro.base.launch import launch_problem  # noqa: E402
from machines import FSDP_TWO_PROCESSES_YAML  # noqa: E402

PROBE = str(HERE / "probe_env.py")
PY = sys.executable
ACC = [PY, "-m", "accelerate.commands.launch"]
TORCHRUN = [PY, "-m", "torch.distributed.run"]
SHOWN = ["RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID"]


MULTI_CPU_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
use_cpu: true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases(tmp: Path) -> list[tuple[str, bool, list[list[str]], dict]]:
    """(name, good launch?, one command per launcher, extra environment)."""
    fsdp, mcpu = tmp / "fsdp.yaml", tmp / "multi_cpu.yaml"
    fsdp.write_text(FSDP_TWO_PROCESSES_YAML)
    mcpu.write_text(MULTI_CPU_YAML)
    cpu = {"ACCELERATE_USE_CPU": "true"}
    p1, p2, p3, p4 = (free_port() for _ in range(4))
    two_machines = [ACC + ["--cpu", "--num_machines", "2", "--machine_rank", str(r), "--main_process_ip",
                           "127.0.0.1", "--main_process_port", str(p1), PROBE] for r in (0, 1)]  # fmt: skip
    torchrun_static = [TORCHRUN + ["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr",
                                   "127.0.0.1", "--master_port", str(p2), PROBE] for r in (0, 1)]  # fmt: skip
    torchrun_c10d = [TORCHRUN + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                 "--rdzv_endpoint", f"127.0.0.1:{p3}", "--rdzv_id", "probe", PROBE]] * 2  # fmt: skip
    return [
        ("python train.py", True, [[PY, PROBE]], {}),
        ("accelerate launch", True, [ACC + [PROBE]], {}),
        ("accelerate launch --cpu", True, [ACC + ["--cpu", PROBE]], {}),
        ("accelerate launch --num_processes 1", True, [ACC + ["--num_processes", "1", PROBE]], {}),
        (
            "torchrun --standalone --nproc_per_node 1",
            True,
            [TORCHRUN + ["--standalone", "--nproc_per_node", "1", PROBE]],
            {},
        ),  # fmt: skip
        (
            "ACCELERATE_USE_CPU=true torchrun --nproc_per_node 1",
            True,
            [TORCHRUN + ["--standalone", "--nproc_per_node", "1", PROBE]],
            cpu,
        ),  # fmt: skip
        (
            "ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2",
            True,
            [TORCHRUN + ["--standalone", "--nproc_per_node", "2", PROBE]],
            cpu,
        ),  # fmt: skip
        ("ACCELERATE_USE_CPU=true torchrun --nnodes 2 (static, 2 launchers)", True, torchrun_static, cpu),
        ("ACCELERATE_USE_CPU=true torchrun --nnodes 2 (c10d, 2 launchers)", True, torchrun_c10d, cpu),
        (
            "accelerate launch --config_file accelerate_config.yaml --num_processes 2",
            False,
            [ACC + ["--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", "2", PROBE]],
            {},
        ),  # fmt: skip
        (
            "accelerate launch --config_file fsdp.yaml (2 processes)",
            False,
            [ACC + ["--config_file", str(fsdp), PROBE]],
            {},
        ),  # fmt: skip
        (
            "accelerate launch --multi_gpu --num_processes 2",
            False,
            [ACC + ["--multi_gpu", "--num_processes", "2", PROBE]],
            {},
        ),  # fmt: skip
        (
            "torchrun --nproc_per_node 2 (no ACCELERATE_USE_CPU)",
            False,
            [TORCHRUN + ["--standalone", "--nproc_per_node", "2", PROBE]],
            {},
        ),  # fmt: skip
        (
            "accelerate launch --cpu --num_processes 2",
            False,
            [ACC + ["--cpu", "--num_processes", "2", PROBE]],
            {},
        ),  # fmt: skip
        (
            "accelerate launch --config_file multi_cpu.yaml (2 processes)",
            False,
            [ACC + ["--config_file", str(mcpu), PROBE]],
            {},
        ),  # fmt: skip
        ("accelerate launch --cpu --num_machines 2 (2 launchers)", False, two_machines, {}),
        (
            "accelerate launch --cpu --num_machines 2 --num_processes 2 (2 launchers)",
            False,
            [c[:-1] + ["--num_processes", "2", "--main_process_port", str(p4), PROBE] for c in two_machines],
            {},
        ),  # fmt: skip
    ]


def run_case(cmds: list[list[str]], extra: dict, timeout: float) -> tuple[list[dict], list[int], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]  # fmt: skip
    records, codes, errs = [], [], ""
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        codes.append(p.returncode)
        errs += err
        dec, i = json.JSONDecoder(), 0
        while (i := out.find('{"pid"', i)) >= 0:  # lines of several processes may run together
            obj, end = dec.raw_decode(out, i)
            records.append(obj)
            i = end
    return records, codes, errs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the raw records here")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    wrong, raw = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, good, cmds, extra in cases(Path(tmp)):
            records, codes, err = run_case(cmds, extra, args.timeout)
            verdicts = [launch_problem(r["env"], r["accelerator"]["num_processes"]) for r in records]
            fired = any(verdicts)
            ok = bool(records) and fired != good
            wrong += not ok
            raw.append({"case": name, "good": good, "exit_codes": codes, "records": records, "verdicts": verdicts})
            print(f"\n== {name}  [{'good' if good else 'BAD'} launch; guard {'fires' if fired else 'silent'}: "
                  f"{'ok' if ok else 'WRONG'}; launcher exit codes {codes}]")  # fmt: skip
            if not records:
                print("   no process reported:", err[-800:])
            for r, v in sorted(zip(records, verdicts, strict=True), key=lambda rv: rv[0]["env"].get("RANK", "")):
                e, a = r["env"], r["accelerator"]
                shown = " ".join(f"{k}={e[k]}" for k in SHOWN if k in e) or "(none of the launch variables)"
                print(f"   pid {r['pid']}: {shown} -> {a['distributed_type'].split('.')[-1]}, "
                      f"num_processes={a['num_processes']}, process_index={a['process_index']}")  # fmt: skip
                if v:
                    print(f"      guard: error: {v}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\n{len(raw) - wrong}/{len(raw)} launches judged right")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

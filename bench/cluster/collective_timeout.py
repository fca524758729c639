"""How long a process waits in a gloo collective for a peer that is gone, and which timeout governs it.

Run under two launchers, one per "machine" (see bench/cluster/two_nodes.py, which drives it):

    ACCELERATE_USE_CPU=true torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr 127.0.0.1 \
        --master_port P bench/cluster/collective_timeout.py --timeout 10 --fault stop|kill|exit --at 20

Both processes all-reduce a tensor in a loop; at iteration --at the last rank stops itself (SIGSTOP: a machine
that hangs or drops off the network, its sockets left open), kills itself (SIGKILL: the kernel closes its sockets)
or exits; with `early_exit` rank 0 exits before the processes meet (a refusal in train.py's preflight), with
`slow_start` it sleeps --at seconds before them (the main process's own checks). The
process that notices prints one JSON line: how long it waited after the fault, and the error.
The process group's timeout is accelerate's InitProcessGroupKwargs(timeout=...), passed to init_process_group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, default=None, help="process group timeout, s (None: torch default)")
    parser.add_argument("--fault", choices=["stop", "kill", "exit", "early_exit", "slow_start"], default="stop")
    parser.add_argument("--at", type=int, default=20)
    parser.add_argument("--op", choices=["all_reduce", "barrier"], default="all_reduce")
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if args.fault == "early_exit" and os.environ.get("RANK") == "0":
        sys.exit(2)  # as train.py's preflight refusing the run on the main process, before the processes meet
    if args.fault == "slow_start" and os.environ.get("RANK") == "0":
        time.sleep(args.at)  # as the main process's checks before the processes meet (data verification: ~25 s)
    t_start = time.time()
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))] if args.timeout else []
    try:
        acc = Accelerator(kwargs_handlers=handlers)
        import torch.distributed as dist

        dist.barrier()  # gloo connects its pairs lazily: the first collective meets the peer
    except Exception as e:
        waited = round(time.time() - t_start, 2)
        error = f"{type(e).__name__}: {str(e)[:300]}"
        report = {"rank": os.environ.get("RANK"), "waited_s": waited, "timeout": args.timeout, "fault": args.fault}
        print(json.dumps({**report, "error": error}), flush=True)
        os._exit(1)
    if args.fault == "slow_start":  # the processes met: how long the punctual one waited for the late one
        met = {"rank": os.environ.get("RANK"), "met_after_s": round(time.time() - t_start, 2), "timeout": args.timeout}
        print(json.dumps(met), flush=True)
        return
    rank, last = acc.process_index, acc.num_processes - 1

    x = torch.ones(1024)
    t_fault = None
    for i in range(10**9):
        if rank == last and i == args.at:
            if args.fault == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif args.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                sys.exit(3)
        if rank == 0 and i == args.at:
            t_fault = time.time()  # the peer faults before its iteration `at`: rank 0's next collective waits
        try:
            if args.op == "all_reduce":
                dist.all_reduce(x)
            else:
                dist.barrier()
            x.fill_(1.0)
        except Exception as e:  # what the trainer would catch
            waited = time.time() - (t_fault or time.time())
            error = f"{type(e).__name__}: {str(e)[:300]}"
            report = {"rank": rank, "iteration": i, "waited_s": round(waited, 2), "timeout": args.timeout}
            print(json.dumps({**report, "fault": args.fault, "error": error}), flush=True)
            os._exit(1)
        if i > args.at + 10**6:
            break


if __name__ == "__main__":
    main()

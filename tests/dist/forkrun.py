"""Run a tests/dist worker on N gloo ranks forked from one interpreter that imported its modules once.

`python -m torch.distributed.run` starts N fresh interpreters, and each spends ~6 s of a 2-core machine importing
torch and megatron-core before its first collective. Here the parent imports the worker's modules (its
``__main__`` block does not run), then forks the ranks with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so workers read the same variables and init env:// as under torchrun.
The tests of what users launch (dsv3-pretrain, the Megatron-LM loop) keep going through torchrun itself.

Usage: python tests/dist/forkrun.py NPROC MASTER_PORT WORKER.py [worker args...]
"""
import os
import runpy
import signal
import sys
import traceback


def _run_rank(rank: int, nproc: int, port: str, worker: str, args: list[str]) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    sys.argv = [worker, *args]
    try:
        runpy.run_path(worker, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> int:
    nproc, port, worker, *args = sys.argv[1:]
    nproc = int(nproc)
    runpy.run_path(worker, run_name="__forkrun_imports__")  # the shared imports, before any rank exists
    ranks = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            os._exit(_run_rank(rank, nproc, port, worker, args))
        ranks[pid] = rank
    failed = []
    while ranks:
        pid, status = os.wait()
        rank, code = ranks.pop(pid), os.waitstatus_to_exitcode(status)
        if code != 0:
            if not failed:  # as torchrun does: the first failed rank ends the others, which may wait on it
                for other in ranks:
                    os.kill(other, signal.SIGKILL)
            failed.append(f"rank {rank} exited with {code}")
    if failed:
        print("forkrun: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

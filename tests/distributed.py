"""Launch a tests/dist worker on gloo ranks and collect its per-rank JSON."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_ranks(worker: str, nproc: int, out_dir: Path, *args: str, timeout: int = 300) -> list[dict]:
    """Run tests/dist/`worker` on `nproc` gloo ranks (forked by tests/dist/forkrun.py) and read rank{r}.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_dir = REPO / "tests" / "dist"
    cmd = [sys.executable, str(dist_dir / "forkrun.py"), str(nproc), str(free_port()), str(dist_dir / worker),
           str(out_dir), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]

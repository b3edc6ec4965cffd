"""benchmarks/gpu_fp8_check.py ends cleanly, with a message and a JSON line, where there is no CUDA device."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_skips_cleanly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_fp8_check.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stderr and "Traceback" not in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "skipped"

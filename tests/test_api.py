"""The public API as a user runs it, in a fresh interpreter."""
import subprocess
import sys

from tests.distributed import REPO


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_readme_one_liner_prints_a_gpt_model():
    result = _python("import megatron_dsv3 as m; m.runtime.initialize(); "
                     "print(m.build_model(m.presets.get_preset('tiny')))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("GPTModel(") and "DSV3MLASelfAttention" in result.stdout
    assert "DeepSeekRouter" in result.stdout and "MultiTokenPredictionBlock" in result.stdout


def test_import_patches_nothing_and_registers_dsv3():
    result = _python(
        "import torch; before = (torch.cuda.current_device, torch.cuda.Stream)\n"
        "import megatron_dsv3 as m\n"
        "from megatron.core.transformer.moe import token_dispatcher\n"
        "import megatron.core.tensor_parallel.mappings as mp\n"
        "assert (torch.cuda.current_device, torch.cuda.Stream) == before\n"
        "assert token_dispatcher.all_to_all is mp.all_to_all\n"
        "print(m.registry.names())")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'dsv3'" in result.stdout


def test_unknown_spec_and_backend_raise_clear_errors(runtime):
    import pytest

    import megatron_dsv3 as m

    with pytest.raises(ValueError, match="--model-spec: unknown spec 'gpt5'"):
        m.build_model(m.presets.get_preset("tiny"), spec="gpt5")
    with pytest.raises(ValueError, match="backend: expected one of"):
        m.build_model(m.presets.get_preset("tiny"), backend="triton")
    with pytest.raises(ValueError, match="backend: 'te' needs Transformer Engine"):
        m.build_model(m.presets.get_preset("tiny"), backend="te")


def test_readme_python_api_block_runs_as_pasted():
    """The README's Public API example, cut out of the README and run unchanged."""
    import re

    text = (REPO / "README.md").read_text()
    section = text.split("## Public API", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = _python(block + "\nprint('ran', loss.shape, len(loads))\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran torch.Size([2, 64])" in result.stdout

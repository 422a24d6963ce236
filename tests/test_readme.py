"""The README is the user's entry point: its quickstart must run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_quickstart_runs_and_learns(capsys):
    blocks = _python_blocks()
    assert blocks, "README has no python block"
    namespace = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    untrained = (namespace["z"] - namespace["target"]).square().mean().item()  # loss of not moving
    assert namespace["loss"].item() < 0.7 * untrained
    assert "loss" in capsys.readouterr().out


def test_set_up_installs_cpu_torch_first():
    text = README.read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 &&" in text
    assert "python -m pytest tests" in text

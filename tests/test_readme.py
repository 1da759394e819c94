"""The README's quickstart runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    assert scope["y"].shape == (8, 16, 32, 32)
    assert scope["p"].shape == (8, 16, 16, 16)
    assert scope["gx"].shape == (8, 3, 32, 32) and scope["gw"].shape == (16, 3, 3, 3)
    assert scope["gp"].shape == scope["y"].shape


def test_training_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    code = re.search(r"## Training a CNN\n.*?```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README training example", "exec"), scope)
    assert scope["probs"].shape == (4, 3)
    assert all(p.grad is not None for p in scope["model"].parameters())
    assert (tmp_path / "shapes.npz").stat().st_size > 0

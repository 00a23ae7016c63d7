"""The README's code blocks run as written, in order, in one namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run():
    # Every ```python block of the README executes without error; the
    # quickstart's predicted accuracy is a real accuracy.
    pytest.importorskip("skorch")
    pytest.importorskip("pandas")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for k, block in enumerate(blocks):
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
        if k == 0:  # the quickstart
            accuracy = namespace["icv"].cv_results_["test_score"].mean()
            assert 0.5 < accuracy <= 1.0

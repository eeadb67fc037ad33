"""The README's Python examples run as written and print what they say."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text()
    match = re.search(re.escape(after_heading) + r".*?```python\n(.*?)```", text, re.S)
    assert match, f"no python block after {after_heading!r} in the README"
    return match.group(1)


def test_usage_example_shapes_and_count(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(_python_block("## Usage"), "README-usage", "exec"), {})
    assert capsys.readouterr().out.split("\n")[:2] == ["(2, 10) (2, 196, 384)", "86567656"]


def test_own_training_loop_example_donates_and_trains() -> None:
    scope: dict = {}
    exec(compile(_python_block("### Your own training loop"), "README-loop", "exec"), scope)
    # The classifier starts at zero, so the first loss is log(10) for any labels.
    assert float(scope["loss"]) == pytest.approx(math.log(10), abs=1e-5)
    # Donated: the step reused the old parameters' buffers, which are gone.
    jax = scope["jax"]
    assert all(not x.is_deleted() for x in jax.tree_util.tree_leaves(scope["params"]))
    params, opt_state = scope["params"], scope["opt_state"]
    leaf = jax.tree_util.tree_leaves(params)[0]
    scope["train_step"](params, opt_state, scope["images"], scope["labels"], jax.random.key(2))
    assert leaf.is_deleted()

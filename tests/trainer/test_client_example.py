"""docs/client.md's ten-line example, run verbatim against a real server on loopback.

The block is read from the doc (so the doc cannot drift from the code), executed with
TEACHER_ADDRESS pointing at the server, and its `scores` are compared with the server's
model's own log-softmax rows for the same sequences.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.trainer.client_fixtures import (  # noqa: F401
    ReferenceModel,
    assert_matches_reference,
    model_dir,
    server,
)
from trainer.client import ScoreSpec, TeacherScores

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def quickstart_block() -> str:
    """The python block that follows the `<!-- example: quickstart -->` marker."""
    match = re.search(
        r"<!-- example: quickstart -->\s*```python\n(.*?)```", DOC.read_text(), re.DOTALL
    )
    assert match, "docs/client.md lost its quickstart example"
    return match.group(1)


def test_quickstart_example_scores_a_batch(
    server: object,  # noqa: F811
    model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = quickstart_block()
    assert len(code.strip().splitlines()) <= 14, "the quickstart should stay about ten lines"
    monkeypatch.setenv("TEACHER_ADDRESS", server.address)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))  # fresh ids each run
    namespace: dict[str, object] = {}
    exec(compile(code, str(DOC), "exec"), namespace)

    batch, scores = namespace["batch"], namespace["scores"]
    assert len(scores) == len(batch) == 4
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4 and all(server.address in line for line in printed)
    specs = [ScoreSpec(ids, 8, 4) for ids in batch]
    rows = ReferenceModel(model_dir).rows_many(specs)
    for got, spec, ref in zip(scores, specs, rows, strict=True):
        assert isinstance(got, TeacherScores)
        assert got.topk_ids.shape == (spec.token_ids.shape[0] - 8, 4)
        assert_matches_reference(got, spec, ref)

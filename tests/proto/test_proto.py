"""The generated modules under proto/ are exactly what `make proto` makes from the .proto files."""

from __future__ import annotations

from pathlib import Path

from proto.codegen import ROOT, generate


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    assert generate(tmp_path) == 0
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run `make proto`"

"""The committed gRPC code under authz/admin/proto/stepup is what tools/gen_protos.py generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) is not installed")
    gen = _tool()
    gen.generate(tmp_path)
    fresh = gen.generated_files(tmp_path)
    committed = gen.generated_files(gen.OUT_ROOT)
    assert sorted(fresh) == sorted(committed)
    for name, data in fresh.items():
        assert committed[name] == data, f"{name} is stale: run python tools/gen_protos.py"


def test_generated_imports_point_into_the_package() -> None:
    from authz.admin.proto.stepup.v1 import sessions_pb2, sessions_pb2_grpc

    assert sessions_pb2.DESCRIPTOR.name == "stepup/v1/sessions.proto"
    assert vars(sessions_pb2_grpc)["stepup_dot_v1_dot_sessions__pb2"] is sessions_pb2

"""End-to-end fixtures: the real stack (Valkey, dev IdP, echo upstream, stepup-authz, Envoy)
as subprocesses on loopback, one stack per test module.

Later modules either use ``stack`` (the demo policy) or build their own::

    @pytest.fixture(scope="module")
    def strict_stack(tmp_path_factory):
        with make_stack(tmp_path_factory, extra_settings={"stepup": {"error_status": 503}}) as s:
            yield s

or ask ``stack_factory(**kwargs)`` for as many stacks as they need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.demo.stack import REPO_ROOT, Stack

DEMO_POLICY = REPO_ROOT / "examples" / "policy.yaml"


@contextlib.contextmanager
def make_stack(tmp_path_factory: pytest.TempPathFactory, **kwargs: Any) -> Iterator[Stack]:
    """A started :class:`Stack` in a fresh temp workdir, stopped on exit.

    ``policy_file`` defaults to the demo policy; other keywords go to ``Stack``.
    """
    kwargs.setdefault("policy_file", DEMO_POLICY)
    workdir: Path = tmp_path_factory.mktemp("stack")
    stack = Stack(workdir, **kwargs)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def stack_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """``stack_factory(**kwargs) -> Stack``: started stacks, all stopped after the module."""
    with contextlib.ExitStack() as stacks:

        def factory(**kwargs: Any) -> Stack:
            return stacks.enter_context(make_stack(tmp_path_factory, **kwargs))

        yield factory


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The full stack with the demo policy (examples/policy.yaml)."""
    with make_stack(tmp_path_factory) as s:
        yield s

"""The service process: policy hot reload (file change and SIGHUP), last good policy kept,
SIGTERM exits cleanly. Through the real Envoy, rendered from the policy at start: a
reload that raises a level shows at once, one that lowers a level shows once Envoy is
rendered again (its per-route levels can only raise: a stale Envoy errs strict)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

from authz.demo.stack import Stack

from .conftest import make_stack

pytestmark = pytest.mark.e2e

POLICY = """\
levels:
  public: {public: true}
  standard: {}
routes:
  - {path_prefix: /open/, level: public}
default_level: standard
"""


@pytest.fixture(scope="module")
def reload_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    with make_stack(
        tmp_path_factory, policy_file=policy, extra_settings={"policy_poll_s": 0.2}
    ) as s:
        yield s, policy


def status(stack: Stack, path: str) -> int:
    try:
        with urlopen(Request(stack.envoy_url + path), timeout=5) as r:  # noqa: S310 - loopback
            return int(r.status)
    except HTTPError as e:
        return int(e.code)


def metric(stack: Stack, name: str) -> float:
    with urlopen(f"{stack.service_http_url}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_file_change_reloads_and_bad_policy_keeps_last_good(
    reload_stack: tuple[Stack, Path],
) -> None:
    stack, policy = reload_stack
    assert status(stack, "/open/x") == 200
    assert status(stack, "/closed/x") == 401
    policy.write_text(POLICY.replace("path_prefix: /open/", "path_prefix: /closed/"))
    # /open/ is no longer public: the service's reload shows through the old Envoy at once.
    assert wait_for(lambda: status(stack, "/open/x") == 401)
    # /closed/ is public now, but the old Envoy still sends it at "standard": strict.
    assert status(stack, "/closed/x") == 401
    stack.restart_envoy()  # rendered from the new policy
    assert status(stack, "/closed/x") == 200
    assert status(stack, "/open/x") == 401
    ok = 'stepup_authz_policy_reloads_total{result="success"}'
    err = 'stepup_authz_policy_reloads_total{result="error"}'
    assert metric(stack, ok) >= 1
    # an invalid file is refused, counted, and the last good policy stays in force
    policy.write_text(POLICY.replace("level: public", "level: nope"))
    assert wait_for(lambda: metric(stack, err) >= 1)
    assert status(stack, "/closed/x") == 200


def test_sighup_reloads(tmp_path_factory: pytest.TempPathFactory) -> None:
    policy = tmp_path_factory.mktemp("hup") / "policy.yaml"
    policy.write_text(POLICY)
    # no file polling within the test's time: only the signal can reload
    with make_stack(
        tmp_path_factory, policy_file=policy, extra_settings={"policy_poll_s": 3600}
    ) as stack:
        policy.write_text(POLICY.replace("path_prefix: /open/", "path_prefix: /hup/"))
        time.sleep(0.5)
        assert status(stack, "/open/x") == 200  # not reloaded by itself
        proc = stack.service_proc
        assert proc is not None
        proc.send_signal(signal.SIGHUP)
        # /open/ lost its public level: visible through Envoy (rendered at start) at once.
        assert wait_for(lambda: status(stack, "/open/x") == 401, timeout=5)


def test_sigterm_exits_cleanly(tmp_path_factory: pytest.TempPathFactory) -> None:
    with make_stack(tmp_path_factory) as stack:
        proc = stack.service_proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log = stack.log_path("service").read_text()
        assert "shutting down" in log and '"stopped"' in log
        # with the service gone, Envoy fails closed
        assert status(stack, "/accounts/1") == 403

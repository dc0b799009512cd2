"""Structured JSON logs on stderr.

Call sites pass fields through ``extra=``; only those fields and the message are written.
Nothing here reads request headers, so a token or cookie can reach a log line only if a
call site passes one explicitly; none does, and a test greps the logs to keep it so.
Inside a traced request (authz/ops/tracing.py) each line carries ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from authz.ops.tracing import current_ids

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and value is not None:
                out[key] = value
        ids = current_ids()  # inside a traced request: the line leads to its trace
        if ids is not None:
            out.setdefault("trace_id", ids[0])
            out.setdefault("span_id", ids[1])
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=True)


def configure_logging(level: str = "INFO", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print query strings (codes, states): keep it off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

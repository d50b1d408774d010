"""Log configuration for the command line: plain text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Control characters from request paths would otherwise let a client forge log lines.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


class TextFormatter(logging.Formatter):
    """A plain-text formatter that escapes control characters in the message as `\\xNN`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROL_ESCAPES)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """A formatter writing each record as one JSON object through the json encoder."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging(level: str, log_format: str, access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("servekit.access").setLevel(logging.INFO if access_log else logging.WARNING)
    # Library warnings go through the handler too, so JSON logs stay one object per line.
    logging.captureWarnings(True)

"""The baselines servekit is compared with, as plain ASGI apps under uvicorn.

    python benchmarks/bare_server.py MODEL.onnx PORT    # parse JSON, run onnxruntime, no batching
    python benchmarks/bare_server.py constant PORT      # return a constant (HTTP alone)

The model server parses `{"instances": [...]}`, runs onnxruntime on the event loop thread with
one request per call, and returns `{"predictions": [...]}`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn

CONSTANT = b'{"predictions": [[0.1, 0.2, 0.7]]}'


async def read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send: Any, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def model_app(path: str) -> Any:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        document = orjson.loads(await read_body(receive))
        inputs = np.asarray(document["instances"], dtype=np.float32)
        (outputs,) = session.run(None, {input_name: inputs})
        await respond(
            send, orjson.dumps({"predictions": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
        )

    return app


async def constant_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await read_body(receive)
    await respond(send, CONSTANT)


def main() -> None:
    target, port = sys.argv[1], int(sys.argv[2])
    app = constant_app if target == "constant" else model_app(target)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()

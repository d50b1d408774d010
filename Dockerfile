# syntax=docker/dockerfile:1
# servekit's container image: `servekit serve` on the model repository at /models, REST on
# 8501 and gRPC on 8500, as a non-root user.
#
#   docker build -t servekit:0.1.0 .
#   docker build -t servekit:0.1.0-tflite --build-arg EXTRAS=tflite .
#   docker run --rm -p 8501:8501 -p 8500:8500 -v "$PWD/models:/models:ro" servekit:0.1.0
#
# Models: mount a repository (one folder per model, numbered versions inside) at /models, or
# bake one in at build time with --build-arg MODELS=path/in/the/build/context. MODELS defaults
# to the built-in example models, so the image serves something out of the box; a volume
# mounted at /models hides them.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Optional dependencies to install, comma-separated: tflite, tensorflow, torch, text, gbm...
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/servekit \
    && if [ -n "$EXTRAS" ]; then package=".[$EXTRAS]"; else package="."; fi \
    && /opt/servekit/bin/pip install "$package"

FROM ${PYTHON_IMAGE}
ARG MODELS=src/servekit/examples/models
# A numeric user, so that Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 servekit \
    && useradd --system --uid 10001 --gid servekit --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin servekit
COPY --from=build /opt/servekit /opt/servekit
# Owned by root and read-only to the server.
COPY ${MODELS} /models
# The repository at /models is served unless MODEL_NAME is set: then, as in TF Serving's image,
# the one model at $MODEL_BASE_PATH/$MODEL_NAME is.
# The address and ports are set here rather than as arguments, so that the health check and
# the server read the same values; change them with `docker run -e SERVEKIT_REST_API_PORT=...`.
ENV PATH=/opt/servekit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVEKIT_MODEL_REPOSITORY=/models \
    MODEL_BASE_PATH=/models \
    SERVEKIT_REST_API_HOST=0.0.0.0 \
    SERVEKIT_REST_API_PORT=8501 \
    SERVEKIT_PORT=8500
USER 10001:10001
EXPOSE 8500 8501
# Docker's health check; Kubernetes ignores it and uses the probes of its own manifests. It
# reads the REST port from SERVEKIT_REST_API_PORT, as the server does.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SERVEKIT_REST_API_PORT', '8501') + '/v2/health/ready', timeout=4)"]
ENTRYPOINT ["servekit", "serve"]
# Arguments given to `docker run` are passed to `servekit serve`.
CMD []

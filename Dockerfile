# buffer-service: runs `buffer-service serve` as a non-root user (uid 10001).
#   docker build -t buffer-service .
#   docker run --env-file .env -p 8080:8080 buffer-service
# The base is a build argument so CI can build on a local Debian image when no registry is
# reachable (scripts/container-smoke.sh); users get the official slim Python image. Any base
# works that has `python3` with the venv module and `useradd`.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
# Everything the service needs goes into one virtualenv; the final stage copies only that, so
# pip, setuptools, wheel caches and the source tree stay behind.
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY buffer_service /src/buffer_service
RUN /opt/venv/bin/pip install --no-cache-dir /src \
 && /opt/venv/bin/pip uninstall --yes --quiet setuptools pip

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080
RUN useradd --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin buffer
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /tmp
EXPOSE 8080
# Liveness: /healthz answers while the process serves HTTP. Readiness (Redis answers) is
# /readyz; docker-compose.yml checks that one. Python's urllib because slim images have no curl.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
ENTRYPOINT ["buffer-service"]
CMD ["serve"]

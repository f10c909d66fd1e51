# buffer-service: a small image that runs `buffer-service serve` as a non-root user.
# Build: docker build -t buffer-service .   Run: docker run --env-file .env -p 8080:8080 buffer-service
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY buffer_service ./buffer_service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOST=0.0.0.0 PORT=8080
RUN useradd --system --uid 10001 --no-create-home buffer
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
EXPOSE 8080
# /healthz answers while the process lives; orchestrators should use /readyz for traffic.
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8080\")}/healthz', timeout=2)"
ENTRYPOINT ["buffer-service"]
CMD ["serve"]

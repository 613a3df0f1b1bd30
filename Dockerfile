# The prompter-worker image: slim, non-root, dependencies in their own cached layer.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the pins change. With
# --build-arg OTEL=true, also the otel extra (OpenTelemetry traces, README "Tracing"),
# pinned by constraints.txt; without it, the image has no OpenTelemetry at all.
ARG OTEL=false
COPY requirements.lock constraints.txt ./
RUN pip install --no-deps -r requirements.lock \
    && if [ "$OTEL" = "true" ]; then pip install -c constraints.txt opentelemetry-api \
        opentelemetry-sdk opentelemetry-exporter-otlp-proto-http; fi

# Then the project itself (no dependency resolution: everything is already installed).
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY worker ./worker
RUN pip install --no-deps . \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin prompter

USER 10001
ENV PROMPTER_ALEMBIC_INI=/app/alembic.ini \
    PROMPTER_LOG_FORMAT=json
ENTRYPOINT ["prompter-worker"]
CMD ["run"]

# syntax=docker/dockerfile:1
# The SparsePilot app image: CLI, flows (run by Prefect workers), dashboard, and the MLflow and Prefect
# servers (same pinned versions as the clients, so server and client never drift apart).
#
#   docker build -t sparsepilot:local .                                    # torch CPU (default)
#   docker build -t sparsepilot:local-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .  # torch with CUDA
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/app/deploy/bin:$PATH \
    SPARSEPILOT_HOME=/data/sparsepilot \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin sparsepilot \
 && mkdir -p /app /data/sparsepilot /mlartifacts /var/lib/prefect \
 && chown sparsepilot:sparsepilot /data/sparsepilot /mlartifacts /var/lib/prefect
WORKDIR /app

# torch first, from the chosen wheel index, so the project's `torch>=...` is already satisfied and pip
# never swaps in a different build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The code. Installed editable: Prefect deployments point at /app as their source directory, so the
# worker runs exactly the files in this image.
COPY . .
RUN pip install --no-deps -e . \
 && chmod 0755 /app/deploy/bin/* /app/deploy/postgres/*.sh \
 && python -c "import sparse_core, rollout, flows, dashboard, sparsepilot"

USER sparsepilot
CMD ["sparsepilot", "--help"]

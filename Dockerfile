# One image for every service of compose.yaml: broker, edges, workers, peer-add
# and the demo wireguard-go client. Build: docker compose build (or docker build -t fabric-vpn:dev .)
FROM python:3.11-slim

# wireguard-go + wg/wg-quick for the demo client, iproute2 for addresses and routes,
# ping for the client's demo traffic
RUN apt-get update \
    && apt-get install -y --no-install-recommends wireguard-go wireguard-tools iproute2 iputils-ping \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fabric ./fabric
COPY brokers ./brokers
COPY workers ./workers
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
ENV FABRIC_STATE_DIR=/var/lib/fabric
VOLUME /var/lib/fabric
# every service of compose.yaml gives its own command
CMD ["fabric", "--help"]

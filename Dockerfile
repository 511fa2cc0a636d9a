# One image for every service of compose.yaml: broker, edges, workers, the peer-add
# services and the demo clients (wireguard-go, openvpn). Build: docker compose build (or docker build -t fabric-vpn:dev .)
FROM python:3.11-slim

# wireguard-go + wg/wg-quick and openvpn for the demo clients, iproute2 for addresses
# and routes, ping for the clients' demo traffic
RUN apt-get update \
    && apt-get install -y --no-install-recommends wireguard-go wireguard-tools openvpn iproute2 iputils-ping \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fabric ./fabric
COPY brokers ./brokers
COPY workers ./workers
# the native data path (setup.py: batch AEAD through OpenSSL, TSO segmentation) is
# compiled here; the compiler and headers go again in the same layer
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y --auto-remove gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/* /src

WORKDIR /
ENV FABRIC_STATE_DIR=/var/lib/fabric
VOLUME /var/lib/fabric
# every service of compose.yaml gives its own command
CMD ["fabric", "--help"]

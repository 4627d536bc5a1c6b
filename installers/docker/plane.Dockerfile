# syntax=docker/dockerfile:1
# The Hatchway plane: `hatchway serve` as a non-root user, its state (SQLite, CA, secret key) in a volume.
# Built from the repository root:
#
#   docker build -f installers/docker/plane.Dockerfile -t hatchway-plane .
#   docker run -d -p 8080:8080 -p 8443:8443 -v hatchway-plane:/var/lib/hatchway hatchway-plane
#
# The admin key is printed once in the logs on the first start (`docker logs`), or set HATCHWAY_ADMIN_KEY.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/hatchway --create-home \
        --shell /usr/sbin/nologin hatchway

WORKDIR /opt/hatchway
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
# The plane needs none of the agent extra (llama.cpp, NVML).
RUN pip install --no-cache-dir . && rm -rf /opt/hatchway/build

USER 10001:10001
# Listen beyond the container's loopback; ports and data dir are the documented defaults.
ENV HATCHWAY_HOST=0.0.0.0 \
    HATCHWAY_PORT=8080 \
    HATCHWAY_GRPC_PORT=8443 \
    HATCHWAY_DATA_DIR=/var/lib/hatchway
VOLUME ["/var/lib/hatchway"]
EXPOSE 8080 8443

# /readyz: storage reachable and the snapshot loaded (the image has Python, not curl).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('HATCHWAY_PORT', '8080'), timeout=4)"]

CMD ["hatchway", "serve"]

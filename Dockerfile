# sealserve server image.
#
#   docker build -t sealserve:0.1.0 .
#   docker run --read-only -p 8001:8001 \
#     -v "$PWD/sealserve.toml:/etc/sealserve/sealserve.toml:ro" \
#     -v "$PWD/models:/models:ro" sealserve:0.1.0
#
# The build logic is deploy/build.sh; tests/deploy/test_build_script.py runs the same
# script on machines without a container engine, and tests/deploy/test_dockerfile.py
# lints this file with hadolint. See docs/deploy.md.
#
# The tag pins the Python minor version and the Debian release. For byte-identical
# images, pin the digest too (python:3.11-slim-trixie@sha256:...) in your fork.

# ---- builder: builds the wheel and installs it, with its runtime dependencies, into a
# self-contained virtualenv at /opt/sealserve. Nothing else of this stage is kept.
FROM python:3.11-slim-trixie AS builder

# A C toolchain, only for a dependency that has no wheel for the target architecture
# (all of them ship manylinux wheels for amd64 and arm64 today). It stays in this stage.
# Not version-pinned: Debian stable only ever receives security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Reproducible wheel archive timestamps (the code digest does not depend on them).
ARG SOURCE_DATE_EPOCH=315532800
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sealserve ./sealserve
COPY deploy/build.sh ./deploy/build.sh
RUN bash deploy/build.sh --prefix /opt/sealserve --wheel-dir /src/wheels --strip-pip

# ---- runtime: the base image plus that one virtualenv. No compilers, no pip, no
# caches, no model (mounted at run time, encrypted), no secrets (mounted at run time).
FROM python:3.11-slim-trixie

# A fixed, unprivileged uid/gid so that volume ownership and Kubernetes runAsUser agree.
# The state directory is group-writable: on a confidential VM the server runs as uid 0
# without capabilities (configfs-tsm, see docs/deploy.md) and group 10001.
# pip, setuptools and wheel of the base image go: nothing installs at run time.
RUN groupadd --system --gid 10001 sealserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin sealserve \
 && python -m pip uninstall -q -y pip setuptools wheel \
 && rm -rf /root/.cache /usr/local/bin/pip* \
 && mkdir -p /etc/sealserve /models /var/lib/sealserve \
 && chown 10001:10001 /var/lib/sealserve \
 && chmod 0770 /var/lib/sealserve

COPY --from=builder /opt/sealserve /opt/sealserve

ENV PATH=/opt/sealserve/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /var/lib/sealserve

# The root file system can be read-only (docker run --read-only, Kubernetes
# readOnlyRootFilesystem). These are the only paths sealserve writes to:
# /var/lib/sealserve holds the embedded state store (SQLite: quotas, statuses);
# /tmp is scratch space for Python and onnxruntime.
VOLUME ["/var/lib/sealserve", "/tmp"]

# gRPC: Open Inference Protocol, attestation, and the standard health service.
EXPOSE 8001

# The server's own health service over the same port (see `sealserve health --help`:
# the in-memory TLS certificate is accepted without chain verification for this probe).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["sealserve", "health", "--target", "127.0.0.1:8001", "--timeout", "5"]

ENTRYPOINT ["sealserve", "serve"]
CMD ["--config", "/etc/sealserve/sealserve.toml"]

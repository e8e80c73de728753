# syntax=docker/dockerfile:1
# magnet_dist runtime image: Ray head, Ray workers and the RayJob submitter (k8s/).
#   docker build -t ghcr.io/magnet-dist/magnet-dist:0.1.0 .   # placeholder registry
# The install is the project's own set-up (scripts/setup_env.sh: .venv/ at the repository root,
# pinned stack, magnet_dist installed editable), run exactly as a developer runs it.
FROM python:3.11-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc/g++: hnswlib and deepspeed build from source, DeepSpeed JIT-compiles its CPU ops at run
# time. wget: KubeRay's exec liveness/readiness probes call it (older operators; newer ones use
# HTTP probes). procps: ps/top for `kubectl exec` debugging.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ wget procps \
 && rm -rf /var/lib/apt/lists/*

# Non-root user (uid/gid 1000, as the pods' securityContext expects); owns /app so that
# setup_env.sh can create /app/.venv.
RUN groupadd --gid 1000 magnet \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash magnet \
 && mkdir /app && chown magnet:magnet /app

# KubeRay starts Ray through `bash -lc` (older releases): a login shell sources /etc/profile,
# which resets PATH on Debian. Put the venv back for login shells too.
RUN echo 'export PATH="/app/.venv/bin:$PATH"' > /etc/profile.d/magnet-venv.sh

WORKDIR /app
COPY --chown=magnet:magnet . /app
USER 1000:1000
ENV HOME=/home/magnet
# BuildKit cache mount: rebuilds after a code change reuse pip's download/wheel cache
# (torch, the deepspeed and hnswlib builds) instead of fetching and compiling again.
RUN --mount=type=cache,target=/home/magnet/.cache/pip,uid=1000,gid=1000 \
    bash scripts/setup_env.sh

ENV VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH

CMD ["python", "launch/train.py", "--help"]

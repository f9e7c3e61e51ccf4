# One image for every Takeoff process: the registry, queue, builder, agent and console services and the CLI,
# chosen by the command (`python -m takeoff_registry`, `takeoff ...`). Docker's classic builder builds it (no BuildKit
# features). The base image is an argument: any Debian image whose `python3` has venv and pip and is 3.11.4 or
# later (tarfile's extraction filters: bookworm's own python3 is too old) and whose CA bundle lets pip reach
# the package index; the official slim image by default, a locally made one where no registry can be reached.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# /opt/takeoff: the venv the image runs; /opt/build: the build backend, which stays in this stage.
RUN python3 -m venv /opt/takeoff && python3 -m venv /opt/build
ENV PATH=/opt/takeoff/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /src
# The dependencies and the build backend, from pyproject.toml alone: a change to the source reuses this layer.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        >requirements.txt \
    && python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
        >build-requirements.txt \
    && pip install --quiet -r requirements.txt \
    && /opt/build/bin/pip install --quiet -r build-requirements.txt
# The console's browser libraries from npm by their lock file; Node.js stays in this stage, the image gets the
# copied files inside the console's package (as `make console-assets` does).
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends npm >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY services/takeoff_console/frontend/package.json services/takeoff_console/frontend/package-lock.json \
    services/takeoff_console/frontend/
RUN NPM_CONFIG_CAFILE=/etc/ssl/certs/ca-certificates.crt \
    npm ci --silent --no-audit --no-fund --prefix services/takeoff_console/frontend
COPY README.md ./
COPY libs libs
COPY services services
RUN npm run --silent --prefix services/takeoff_console/frontend vendor \
    && /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && pip install --quiet --no-deps /tmp/wheels/*.whl

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# git: the registry resolves git references and the builder fetches git sources with it.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends git >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --home-dir /var/lib/takeoff --create-home --shell /usr/sbin/nologin takeoff \
    && install -d -o takeoff -g takeoff /run/takeoff /var/lib/takeoff/keys
COPY --from=build /opt/takeoff /opt/takeoff
ENV PATH=/opt/takeoff/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TAKEOFF_HOME=/var/lib/takeoff
USER 10001
WORKDIR /var/lib/takeoff
CMD ["takeoff", "--help"]

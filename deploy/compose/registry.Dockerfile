# A stand-in for the official registry image (registry:2) where none can be pulled: Debian's docker-registry
# on a Debian base image (BASE_IMAGE), storing images in /var/lib/registry and listening on
# $REGISTRY_HTTP_ADDR (as the official image reads it; default :5000).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends docker-registry >/dev/null \
    && rm -rf /var/lib/apt/lists/* /etc/docker/registry/config.yml \
    && install -d -o docker-registry /var/lib/registry
COPY registry.yml /etc/docker/registry/config.yml
ENV REGISTRY_HTTP_ADDR=:5000
USER docker-registry
CMD ["docker-registry", "serve", "/etc/docker/registry/config.yml"]

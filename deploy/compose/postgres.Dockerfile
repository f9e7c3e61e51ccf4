# A stand-in for the official PostgreSQL image where none can be pulled: Debian's server on a Debian base image
# (BASE_IMAGE), taking the official image's settings (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA,
# PGPORT) and its data directory, so docker-compose.yml runs on either.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# The package's own cluster is not made (the entrypoint makes one in PGDATA): it would only cost time.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/no-main-cluster.conf \
    && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres /var/lib/postgresql/data /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data
USER postgres
ENTRYPOINT ["postgres-entrypoint"]

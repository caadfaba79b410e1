# syntax=docker/dockerfile:1
#
# notification-service: a two-stage build.
#
#   docker build -t notification-service .
#   docker run --security-opt seccomp=unconfined --ulimit nofile=1048576:1048576 \
#       -p 8080:8080 -v notification-data:/data notification-service
#
# The server does all its socket I/O through io_uring (glommio). Docker's default seccomp profile has
# blocked the io_uring system calls since Docker 25, so the container needs a seccomp profile that allows
# them (see tuning.md), or `--security-opt seccomp=unconfined`. Without it the shards cannot start.
#
# Not built on the development machine (it has no Docker engine); see README.md, "Running in Docker".

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace: the server, the loadtest member (the workspace manifest names it) and the SQL
# migrations that are compiled into the binary. .dockerignore keeps target/ and local data out.
COPY . .
# BuildKit cache mounts keep the crate downloads and the build directory between builds, so a code
# change does not download and compile every dependency again. --locked: build exactly Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin notification-service \
    && cp target/release/notification-service /usr/local/bin/notification-service

FROM debian:bookworm-slim
# Quiet hours read IANA time zones from the system's database (src/preferences.rs); slim has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged uid; /data is the SQLite store's folder and the only place the server writes.
RUN groupadd --system --gid 10001 notif \
    && useradd --system --uid 10001 --gid notif --home-dir /data --shell /usr/sbin/nologin notif \
    && mkdir -p /data \
    && chown notif:notif /data
COPY --from=build /usr/local/bin/notification-service /usr/local/bin/notification-service
USER notif
WORKDIR /data
VOLUME ["/data"]
ENV HOST=0.0.0.0 \
    PORT=8080 \
    DATABASE_URL=sqlite:///data/notifications.db \
    RUST_LOG=info
EXPOSE 8080
# The image has neither curl nor wget; bash's /dev/tcp sends the request, `head` and `grep` (both in
# bookworm-slim) check the status line. /health answers 503 when the store is down, which fails this.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT:-8080} && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# SIGTERM starts the graceful shutdown: WebSockets get close 1001, requests in flight are answered, the
# store commits what is queued. Give it more than SHUTDOWN_TIMEOUT_S (10 s) before a SIGKILL:
# `docker stop --time 30`, or `stop_grace_period: 30s` in compose.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/notification-service"]

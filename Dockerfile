# syntax=docker/dockerfile:1
#
# One image with every binary of the Incoming Mail Agent: token-broker,
# imap-fetcher, pop-fetcher, form-processor and the mailagent CLI. The
# compose file picks the binary with `command:`.
#
#   docker build -t mailagent .
#   docker run --rm mailagent mailagent --help
#
# Stages: chef (toolchain + cargo-chef) → planner (the dependency recipe)
# → builder (dependencies, cached while Cargo.toml/Cargo.lock are unchanged;
# then the workspace) → runtime (debian:bookworm-slim, non-root).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG PACKAGES="-p token-broker -p imap-fetcher -p pop-fetcher -p form-processor -p mailagent"
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is rebuilt when the recipe changes, not
# when our own sources do.
RUN cargo chef cook --release --locked --recipe-path recipe.json ${PACKAGES}
COPY . .
RUN cargo build --release --locked ${PACKAGES} --bins \
 && mkdir -p /out \
 && for b in token-broker imap-fetcher pop-fetcher form-processor mailagent; do \
        cp "target/release/$b" /out/; \
    done

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: the platform roots for TLS to Entra ID, Exchange Online,
# and rediss:// / amqps:// (webpki roots are built in as well).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 mailagent \
 && useradd --system --uid 10001 --gid mailagent --home-dir /var/lib/mailagent \
        --shell /usr/sbin/nologin mailagent \
 && install -d -o mailagent -g mailagent /var/lib/mailagent /var/lib/mailagent/data \
 && install -d /etc/mailagent
COPY --from=builder /out/ /usr/local/bin/
# Health check: GET /healthz on the admin port. The image has no curl, and
# the binaries have no health subcommand; deploy/healthcheck speaks HTTP/1.0
# over bash's /dev/tcp (bash is part of every Debian image). This keeps the
# runtime image free of curl and its ~20 libraries and their CVEs, for a
# check that only needs one plain-HTTP request on loopback.
COPY --chmod=0755 deploy/healthcheck /usr/local/bin/mailagent-healthcheck

USER mailagent:mailagent
# The relative default store path (sqlite://data/records.db) lands here.
WORKDIR /var/lib/mailagent
ENV MAILAGENT_CONFIG=/etc/mailagent/mailagent.toml \
    MAILAGENT_ADMIN__LISTEN=0.0.0.0:9100
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/mailagent-healthcheck"]
# SIGTERM is the graceful stop (spec §7); the binaries exit 0 within ~30 s.
STOPSIGNAL SIGTERM
CMD ["mailagent", "--help"]

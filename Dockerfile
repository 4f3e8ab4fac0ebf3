# canaryd's container image. Build: docker build -t canaryd .
# The build stage runs README's build command; the runtime stage is a slim Debian with the binary,
# the shipped models (override with a volume on /etc/canaryd/models or CANARYD_MODELS_DIR), a
# non-root user and the data dir as a volume. tests/image.rs holds this file to README and starts
# the binary with these settings.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin canaryd

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/canaryd --create-home canaryd
COPY --from=build /src/target/release/canaryd /usr/local/bin/canaryd
COPY models /etc/canaryd/models
# Listening beyond loopback needs CANARYD_API_TOKEN (docker run -e CANARYD_API_TOKEN=...): the
# daemon refuses to start without it.
ENV CANARYD_DATA_DIR=/var/lib/canaryd \
    CANARYD_MODELS_DIR=/etc/canaryd/models \
    CANARYD_OTLP_GRPC_ADDR=0.0.0.0:4317 \
    CANARYD_OTLP_HTTP_ADDR=0.0.0.0:4318 \
    CANARYD_HTTP_ADDR=0.0.0.0:8080
VOLUME ["/var/lib/canaryd"]
USER canaryd
EXPOSE 4317 4318 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s CMD ["canaryd", "healthcheck"]
ENTRYPOINT ["canaryd"]
CMD ["serve"]

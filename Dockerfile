# Floodgate: release build in a Rust image, run from a small Debian image as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin floodgate && strip target/release/floodgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin floodgate
COPY --from=build /src/target/release/floodgate /usr/local/bin/floodgate
USER floodgate
EXPOSE 6432 9187
# `floodgate healthcheck` asks the [metrics] endpoint for /healthz (no curl in the image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["floodgate", "healthcheck", "127.0.0.1:9187"]
ENTRYPOINT ["floodgate"]
CMD ["--config", "/etc/floodgate/floodgate.toml"]

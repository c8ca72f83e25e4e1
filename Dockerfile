# Multi-stage build: compile in the Rust image, run on a slim Debian.
#   docker build -t runestone .
#   docker run -p 8080:8080 -p 9464:9464 -v $PWD/conf:/etc/runestone runestone
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY crates ./crates
RUN cargo build --release --locked -p runestone -p runestone-mock

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin runestone
COPY --from=build /src/target/release/runestone /usr/local/bin/runestone
COPY --from=build /src/target/release/runestone-mock /usr/local/bin/runestone-mock
COPY conf/runestone.yaml /etc/runestone/runestone.yaml
USER runestone
EXPOSE 8080 9464
# Listen addresses come from the config: use 0.0.0.0 for the API, and for
# metrics when Prometheus scrapes from outside the container.
ENTRYPOINT ["/usr/local/bin/runestone"]
CMD ["--config", "/etc/runestone/runestone.yaml"]

# One image holding the four service binaries and the console; the Helm chart runs
# /usr/local/bin/tessera-<service>. Not built in CI here (no Docker engine on the
# project's machines); build it where Docker runs:
#   docker build -t tessera:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p tessera-ingest -p tessera-identity -p tessera-profiles -p tessera-activation -p tessera-console \
 && mkdir /out \
 && cp target/release/tessera-ingest target/release/tessera-identity \
       target/release/tessera-profiles target/release/tessera-activation \
       target/release/tessera-console /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin tessera
COPY --from=build /out/ /usr/local/bin/
USER 10001
ENV TESSERA_LOG_FORMAT=json
EXPOSE 8080
CMD ["/usr/local/bin/tessera-ingest"]

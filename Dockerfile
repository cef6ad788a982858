# ocigate container image: a static (musl) binary on an empty base, running as non-root.
#
#   docker build -t ocigate .
#   docker run -p 5000:5000 -v ocigate-cache:/var/cache/ocigate ocigate
#                                    # caching Docker Hub mirror (embedded config)
#   docker run -p 5000:5000 -v $PWD/ocigate.yaml:/etc/ocigate/ocigate.yaml:ro \
#              -e OCIGATE_CONFIG=/etc/ocigate/ocigate.yaml ocigate
#
# Stop it with `docker stop`: SIGTERM lets in-flight transfers finish (server.shutdown_grace).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin ocigate \
 && mkdir -p /out/etc/ssl/certs \
 && cp target/x86_64-unknown-linux-musl/release/ocigate /out/ocigate \
 && cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ca-certificates.crt \
 && echo 'ocigate:x:65532:65532:ocigate:/:/nonexistent' > /out/etc/passwd \
 && echo 'ocigate:x:65532:' > /out/etc/group \
 && mkdir -p /out-cache

# Runtime: the binary, CA roots and a user; nothing else (no shell, no package manager).
FROM scratch AS runtime
COPY --from=build /out/ /
# The cache directory, owned by the user ocigate runs as; a volume, so it outlives the
# container.
COPY --from=build --chown=65532:65532 /out-cache/ /var/cache/ocigate/
VOLUME /var/cache/ocigate
USER 65532:65532
ENV OCIGATE_LISTEN=0.0.0.0:5000 OCIGATE_CACHE_DIR=/var/cache/ocigate
EXPOSE 5000
ENTRYPOINT ["/ocigate"]
CMD ["serve", "--log-format", "json"]

# syntax=docker/dockerfile:1
# The vmkeep image: one binary for the operator (`vmkeep run`), the launcher Pods
# (`vmkeep launch`) and `vmkeep crd`.
#
#   docker build -t vmkeep:0.1.0 .        (or: podman build / buildah bud)
#
# Without a container engine, hack/image.sh builds an equivalent OCI image from Debian packages
# and checks that its entrypoint runs as uid 65532.

# The crate's rust-version (Cargo.toml); the builder and the runtime are both Debian 12, so the
# binary links against the glibc it runs with.
ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target folders are build caches: a rebuild after a source change only
# compiles vmkeep itself.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin vmkeep \
 && install -m 0755 target/release/vmkeep /vmkeep

# glibc, libgcc_s, CA certificates, /etc/passwd with nonroot (65532); no shell, no package
# manager. Pin it by digest for reproducible builds: cc-debian12:nonroot@sha256:...
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /vmkeep /vmkeep
LABEL org.opencontainers.image.title="vmkeep" \
      org.opencontainers.image.description="VM disk images on Kubernetes, persistent or cloned per VM" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["/vmkeep"]

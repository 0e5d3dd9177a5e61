# syntax=docker/dockerfile:1
# The vmkeep images: the operator (`vmkeep run`, `vmkeep crd`; the default target) and the
# launcher (the same binary for `vmkeep launch`, with QEMU and qemu-img).
#
#   docker build -t vmkeep:0.1.0 .        (or: podman build / buildah bud)
#   docker build --target launcher -t vmkeep-launcher:0.1.0 .
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

# QEMU (TCG, and KVM where /dev/kvm works) and qemu-img from Debian 12, as hack/images.sh packs.
FROM docker.io/library/debian:bookworm-slim AS launcher
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /vmkeep /vmkeep
LABEL org.opencontainers.image.title="vmkeep-launcher" \
      org.opencontainers.image.description="vmkeep launch with QEMU and qemu-img" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["/vmkeep"]

# glibc, libgcc_s, CA certificates, /etc/passwd with nonroot (65532); no shell, no package
# manager. Pin it by digest for reproducible builds: cc-debian12:nonroot@sha256:...
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /vmkeep /vmkeep
LABEL org.opencontainers.image.title="vmkeep" \
      org.opencontainers.image.description="VM disk images on Kubernetes, persistent or cloned per VM" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["/vmkeep"]

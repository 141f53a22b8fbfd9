# syntax=docker/dockerfile:1
#
# finetuned container images. NOTE: written without a Docker engine on the dev machine, so these
# builds are untested; keep them in step with Cargo.toml.
#
#   CPU (default target):  docker build -t finetuned .
#   CUDA:                  docker build --target cuda --build-arg CUDA_COMPUTE_CAP=90 -t finetuned:cuda .
#                          docker run --gpus all -p 8080:8080 finetuned:cuda
#
# CUDA_COMPUTE_CAP is the GPU's compute capability without the dot (80 = A100, 86 = RTX 30xx,
# 89 = L4/RTX 40xx, 90 = H100/H200). Needs BuildKit (the default builder of Docker 23+).

ARG CUDA_VERSION=12.4.1

# ---------------------------------------------------------------------------------------------
# CPU build
# ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# sqlx query macros (if any) compile against the checked-in .sqlx/ data, not a live database.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,id=finetuned-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=finetuned-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=finetuned-target-cpu,target=/src/target \
    cargo build --release --locked --bin finetuned \
 && install -m 0755 target/release/finetuned /usr/local/bin/finetuned

# ---------------------------------------------------------------------------------------------
# CUDA build (--features cuda): candle's kernels are compiled with nvcc for CUDA_COMPUTE_CAP.
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS cuda-builder
ARG CUDA_COMPUTE_CAP=90
ARG RUST_TOOLCHAIN=stable
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH} \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config curl ca-certificates git \
 && rm -rf /var/lib/apt/lists/*
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_TOOLCHAIN}"
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=finetuned-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=finetuned-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=finetuned-target-cuda,target=/src/target \
    cargo build --release --locked --features cuda --bin finetuned \
 && install -m 0755 target/release/finetuned /usr/local/bin/finetuned

# ---------------------------------------------------------------------------------------------
# CUDA runtime: cuBLAS, cuRAND and NVRTC come with the image, the driver (libcuda) from the host
# through the NVIDIA Container Toolkit.
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS cuda
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 finetuned \
 && useradd --system --uid 10001 --gid finetuned --home-dir /data --shell /usr/sbin/nologin finetuned \
 && mkdir -p /data /models \
 && chown finetuned:finetuned /data /models
COPY --from=cuda-builder /usr/local/bin/finetuned /usr/local/bin/finetuned
ENV FINETUNED_ADDR=0.0.0.0:8080 \
    FINETUNED_DATA_DIR=/data \
    FINETUNED_MODELS_DIR=/models \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/data", "/models"]
EXPOSE 8080
USER finetuned
WORKDIR /data
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${FINETUNED_ADDR##*:}/healthz" >/dev/null || exit 1
ENTRYPOINT ["finetuned"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CPU runtime (default target: last stage)
# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 finetuned \
 && useradd --system --uid 10001 --gid finetuned --home-dir /data --shell /usr/sbin/nologin finetuned \
 && mkdir -p /data /models \
 && chown finetuned:finetuned /data /models
COPY --from=builder /usr/local/bin/finetuned /usr/local/bin/finetuned
ENV FINETUNED_ADDR=0.0.0.0:8080 \
    FINETUNED_DATA_DIR=/data \
    FINETUNED_MODELS_DIR=/models
VOLUME ["/data", "/models"]
EXPOSE 8080
USER finetuned
WORKDIR /data
# The port is taken from FINETUNED_ADDR so the check follows an overridden address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${FINETUNED_ADDR##*:}/healthz" >/dev/null || exit 1
ENTRYPOINT ["finetuned"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# Build: docker build -t coresdk .
# The image runs `coresdk serve` as an unprivileged user with its store on a volume.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them. Cargo reads every workspace member's
# manifest, so the benchmark's comes too, with a stub source; the image never builds it.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bench/Cargo.toml ./bench/
COPY proto ./proto
COPY rules ./rules
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked -p coresdk --bin coresdk \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p coresdk --bin coresdk

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/coresdk --create-home coresdk
COPY --from=build /src/target/release/coresdk /usr/local/bin/coresdk
USER 10001
WORKDIR /var/lib/coresdk
ENV CORESDK_STORE=sqlite:///var/lib/coresdk/data/coresdk.db \
    CORESDK_LOG_FORMAT=json
VOLUME ["/var/lib/coresdk/data"]
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s CMD ["coresdk", "health"]
ENTRYPOINT ["coresdk"]
CMD ["serve"]

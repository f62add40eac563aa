# harmonylite image: harmonylite, a current nats-server, CA certificates, a
# non-root user, no shell.
#
#   scripts/build-image.sh            (buildah, no Docker engine needed)
#   docker build -t harmonylite .
#
# The harmonylite binary is linked dynamically against Debian 12's libraries,
# which are copied next to it (the loader, libc and every library ldd names):
# the static musl build (docs/kubernetes.md) is not possible yet.
FROM debian:bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
        build-essential cmake pkg-config git ca-certificates golang-go \
        libsqlite3-dev libnats-dev libcbor-dev libzstd-dev libcjson-dev libyaml-dev \
        libmicrohttpd-dev libcurl4-openssl-dev libc-ares-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY src ./src
COPY scripts ./scripts
COPY bench ./bench
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DHL_TESTS=OFF -DHL_WERROR=ON \
    && cmake --build /build -j2 --target harmonylite \
    && strip /build/harmonylite
# A current nats-server, CGO off, built by the project's own script (Debian's go
# fetches the pinned toolchain through the module proxy).
RUN cp "$(bash scripts/install-go-tools.sh nats-server | tail -n1)" /nats-server
# The image's whole root.
RUN set -e; mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/tmp; chmod 1777 /rootfs/tmp; \
    cp /build/harmonylite /nats-server /rootfs/usr/local/bin/; \
    for lib in $(ldd /build/harmonylite | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'); do \
        cp --parents -L "$lib" /rootfs/; \
    done; \
    cat /usr/share/ca-certificates/mozilla/*.crt >/rootfs/etc/ssl/certs/ca-certificates.crt; \
    echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/nonexistent' >/rootfs/etc/passwd; \
    echo 'nonroot:x:65532:' >/rootfs/etc/group

FROM scratch
COPY --from=build /rootfs /
ENV PATH=/usr/local/bin
USER 65532:65532
EXPOSE 8080 6222
ENTRYPOINT ["/usr/local/bin/harmonylite"]
CMD ["-help"]

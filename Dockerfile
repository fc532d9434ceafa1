# Multi-stage image build. It cannot be built on the development machines (no Docker engine);
# it follows the same recipe as `cargo xtask build` (see docs/toolchain.md).
#
#   docker build -t eks-pod-identity-agent:0.1.0 .
#   docker build --target fake-eks-auth -t fake-eks-auth:kind .   # test double for deploy/kind

FROM rust:1.95-bookworm AS build
# rustc-web, its prebuilt BPF core and LLVM 22 come from bookworm's update and backport pockets.
RUN echo "deb http://deb.debian.org/debian bookworm-backports main" \
      > /etc/apt/sources.list.d/backports.list
WORKDIR /src
COPY . .
RUN cargo xtask setup --toolchain-only \
 && cargo xtask build \
 && cargo build --release -p tests --bin fake-eks-auth
# Ship the binary without its debug info (symbols kept); the debug file stays in this stage.
RUN cd target/release \
 && objcopy --only-keep-debug eks-pod-identity-agent eks-pod-identity-agent.debug \
 && objcopy --strip-debug --add-gnu-debuglink=eks-pod-identity-agent.debug eks-pod-identity-agent

# Runtime: glibc and nothing else; no shell. Runs as root so the capabilities the DaemonSet
# grants (BPF, NET_ADMIN, NET_BIND_SERVICE) are effective.
FROM gcr.io/distroless/cc-debian12 AS agent
COPY --from=build /src/target/release/eks-pod-identity-agent /eks-pod-identity-agent
ENTRYPOINT ["/eks-pod-identity-agent"]
CMD ["server", "--help"]

FROM gcr.io/distroless/cc-debian12:nonroot AS fake-eks-auth
COPY --from=build /src/target/release/fake-eks-auth /fake-eks-auth
ENTRYPOINT ["/fake-eks-auth"]

# The default target is the agent.
FROM agent

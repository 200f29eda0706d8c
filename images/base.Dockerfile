# localhost/blocksmith-base:bookworm, for hosts with no registry: what
# gcr.io/distroless/static-debian12:nonroot provides, made from this machine's files. No
# libraries: images/Dockerfile brings those. Its context, made by images/build:
#   rootfs/   etc/{passwd,group,nsswitch.conf,os-release}, etc/ssl/certs/ca-certificates.crt,
#             an empty tmp/ (mode 1777) and an empty home/
#   nonroot/  an empty directory, the nonroot user's /home/nonroot
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 nonroot/ /home/nonroot/
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER 65532:65532

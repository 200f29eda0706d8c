# The pod sandbox ("pause") image for the local testbed, from the static pause binary that
# e2e/scripts/install.sh builds from the Kubernetes source. Made by `images/build --pause`.
FROM scratch
COPY bin/pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]

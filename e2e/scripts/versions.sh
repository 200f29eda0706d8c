# The versions the testbed and the image are built from, defined once; sourced by
# e2e/scripts/install.sh, e2e/testbed and images/build.
# shellcheck shell=bash disable=SC2034

# Debian's kubernetes source package (Kubernetes 1.20.2): kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy, kubelet and pause are built from it.
K8S_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
# The S3 server the testbed runs (cargo install s3s-fs).
S3S_VERSION="0.14.1"

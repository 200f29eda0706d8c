# shellcheck shell=bash
# The testbed's node, sourced by e2e/testbed: containerd + runc + CNI bridge, kubelet,
# kube-proxy and kube-scheduler 1.20.2, on addresses that exist only on this machine.
#
# Network safety (nothing a pod or the node sends may leave the machine):
# - the node address is on a device of its own (a bridge without ports, standing in for a
#   dummy device); the apiserver, kubelet, broker and S3 server
#   bind it, so pods reach them as local addresses (INPUT, never FORWARD);
# - the pod bridge is not a CNI "gateway": the plugin then never turns on ip_forward, and the
#   testbed gives the bridge its address itself. With forwarding off, a packet from a pod to
#   any address that is not this machine's has no route (`ip route get ... iif` says so);
# - a guard chain first in FORWARD drops anything to or from the pod range or the bridge that
#   is not pod-to-pod, in case something else turns forwarding on;
# - the service range is routed to that device: kube-proxy's DNAT applies to locally
#   generated ClusterIP traffic (a blackhole route would fail it before NAT) and whatever is
#   not DNATed is dropped there;
# - containerd pulls through a proxy address that refuses connections, so a missing image
#   fails at once instead of resolving a registry's name.
# One node per machine: kube-proxy owns the machine's KUBE-* iptables chains.

NODE_NAME=blocksmith-node
NODE_IF=bsmnode0
NODE_IP=10.214.0.1
BRIDGE=bsmbr0
POD_CIDR=10.244.0.0/24
POD_GATEWAY=10.244.0.1
GUARD=BLOCKSMITH-GUARD
SANDBOX_IMAGE=localhost/blocksmith/pause:3.4.1
NODE_LOCK=/run/blocksmith-testbeds/node
# The sysctls the node changes (kube-proxy sets route_localnet; kubelet its kernel tunables),
# restored on down.
NODE_SYSCTLS="net.ipv4.ip_forward net.ipv4.conf.all.route_localnet vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"

node_paths() {
  NODE_DIR="$DIR/node"
  CONTAINERD_SOCK="$NODE_DIR/containerd.sock"
}

ctr_() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }

node_network_up() {
  node_paths
  mkdir -p "$(dirname "$NODE_LOCK")" "$NODE_DIR"
  if [ -e "$NODE_LOCK" ] && [ "$(cat "$NODE_LOCK")" != "$DIR" ] && [ -f "$(cat "$NODE_LOCK")/env" ]; then
    die "the testbed in $(cat "$NODE_LOCK") has this machine's node; run: e2e/testbed down $(cat "$NODE_LOCK")"
  fi
  echo "$DIR" >"$NODE_LOCK"
  [ -f "$NODE_DIR/sysctl.saved" ] || for s in $NODE_SYSCTLS; do
    echo "$s=$(sysctl -n "$s" 2>/dev/null)"
  done >"$NODE_DIR/sysctl.saved"
  ip netns list | awk '{print $1}' >"$NODE_DIR/netns.before"
  local d
  for d in /var/log/pods /var/log/containers; do [ -e "$d" ] || echo "$d"; done >"$NODE_DIR/dirs.made"

  # The node's device: a bridge without ports, as a dummy device (kernels without the dummy
  # driver have bridges): its addresses are local, and what is routed to it goes nowhere.
  ip link show "$NODE_IF" >/dev/null 2>&1 || ip link add "$NODE_IF" type bridge \
    || die "cannot create $NODE_IF (needs root / CAP_NET_ADMIN)"
  ip addr replace "$NODE_IP/32" dev "$NODE_IF"
  ip link set "$NODE_IF" up
  ip route replace "$SERVICE_RANGE" dev "$NODE_IF"

  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$POD_GATEWAY/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up

  iptables -w -N "$GUARD" 2>/dev/null || iptables -w -F "$GUARD"
  iptables -w -A "$GUARD" -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
  iptables -w -A "$GUARD" -i "$BRIDGE" -j DROP
  iptables -w -A "$GUARD" -o "$BRIDGE" -j DROP
  iptables -w -A "$GUARD" -s "$POD_CIDR" -j DROP
  iptables -w -A "$GUARD" -d "$POD_CIDR" -j DROP
  guard_first
}

# Keeps the guard the first rule of FORWARD (kube-proxy prepends its own KUBE-FORWARD).
guard_first() {
  [ "$(iptables -w -S FORWARD | sed -n 2p)" = "-A FORWARD -j $GUARD" ] && return 0
  while iptables -w -D FORWARD -j "$GUARD" 2>/dev/null; do :; done
  iptables -w -I FORWARD 1 -j "$GUARD"
}

node_network_down() {
  node_paths
  # Another testbed's node is not ours to take down.
  if [ -e "$NODE_LOCK" ] && [ "$(cat "$NODE_LOCK")" != "$DIR" ]; then return 0; fi
  while iptables -w -D FORWARD -j "$GUARD" 2>/dev/null; do :; done
  iptables -w -F "$GUARD" 2>/dev/null || true
  iptables -w -X "$GUARD" 2>/dev/null || true
  remove_kube_chains
  # Pod network namespaces a crashed kubelet never tore down (their veths go with them).
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep '^cni-' || true); do
    grep -qx "$ns" "$NODE_DIR/netns.before" 2>/dev/null || ip netns del "$ns" 2>/dev/null || true
  done
  local d
  for d in $(cat "$NODE_DIR/dirs.made" 2>/dev/null); do rmdir "$d" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  ip route del "$SERVICE_RANGE" dev "$NODE_IF" 2>/dev/null || true
  ip link del "$NODE_IF" 2>/dev/null || true
  if [ -f "$NODE_DIR/sysctl.saved" ]; then
    local line
    while IFS= read -r line; do
      [ -n "${line#*=}" ] && sysctl -qw "$line" 2>/dev/null || true
    done <"$NODE_DIR/sysctl.saved"
    rm -f "$NODE_DIR/sysctl.saved"
  fi
  [ "$(cat "$NODE_LOCK" 2>/dev/null)" = "$DIR" ] && rm -f "$NODE_LOCK"
  return 0
}

# kubelet and kube-proxy add KUBE-* chains (and jumps to them from the built-in chains) and
# leave them when they exit.
remove_kube_chains() {
  local table rule chain
  for table in filter nat mangle; do
    { iptables -w -t "$table" -S 2>/dev/null || true; } \
      | { grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' || true; } \
      | while IFS= read -r rule; do
          # shellcheck disable=SC2086
          eval "iptables -w -t $table -D ${rule#-A }" 2>/dev/null || true
        done
    for chain in $(iptables -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
      iptables -w -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
      iptables -w -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}

containerd_up() {
  node_paths
  local c="$NODE_DIR/containerd"
  mkdir -p "$c" "$NODE_DIR/cni" "$NODE_DIR/ipam"
  containerd config default | python3 -c '
import re, sys
root, state, sock, sandbox, cni_conf, opt = sys.argv[1:]
s = sys.stdin.read()
def sub(pattern, value):
    global s
    s, n = re.subn(pattern, lambda m: m.group(1) + value, s, count=1, flags=re.M)
    assert n == 1, pattern
sub(r"^(root = ).*$", f"\"{root}\"")
sub(r"^(state = ).*$", f"\"{state}\"")
sub(r"^(\[grpc\]\n  address = ).*$", f"\"{sock}\"")
sub(r"^(    sandbox_image = ).*$", f"\"{sandbox}\"")
# The machine withholds CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (README.md,
# "Known limits of the local testbed").
sub(r"^(    restrict_oom_score_adj = ).*$", "true")
sub(r"^(      bin_dir = ).*$", "\"/usr/lib/cni\"")
sub(r"^(      conf_dir = ).*$", f"\"{cni_conf}\"")
sub(r"^(  \[plugins\.\"io\.containerd\.internal\.v1\.opt\"\]\n    path = ).*$", f"\"{opt}\"")
print(s)
' "$c/root" "$c/state" "$CONTAINERD_SOCK" "$SANDBOX_IMAGE" "$NODE_DIR/cni" "$c/opt" >"$c/config.toml"
  cat >"$NODE_DIR/cni/10-blocksmith.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "blocksmith",
  "plugins": [{
    "type": "bridge",
    "bridge": "$BRIDGE",
    "isGateway": false,
    "isDefaultGateway": false,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "dataDir": "$NODE_DIR/ipam",
      "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
      "routes": [{"dst": "0.0.0.0/0", "gw": "$POD_GATEWAY"}]
    }
  }]
}
EOF
  # Image pulls go to a proxy address nothing listens on: they fail here, never resolve or
  # reach a registry (the testbed's images are imported).
  start containerd env HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY= \
    containerd --config "$c/config.toml"
  wait_for containerd 60 ctr --address "$CONTAINERD_SOCK" version
}

# import_image ARCHIVE: a docker-archive into the node's CRI image store.
import_image() {
  node_paths
  ctr_ images import "$1" >/dev/null
}

node_up() {
  node_paths
  local k="$NODE_DIR/kubelet"
  mkdir -p "$k"
  echo "nameserver 127.0.0.1" >"$NODE_DIR/resolv.conf"
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzPort: 0
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
makeIPTablesUtilChains: false
resolvConf: $NODE_DIR/resolv.conf
clusterDomain: cluster.local
volumePluginDir: $NODE_DIR/volume-plugins
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization:
  mode: Webhook
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  log "kubelet $NODE_NAME on $NODE_IP"
  start kubelet "$K8S_BIN/kubelet" --config="$NODE_DIR/kubelet.yaml" \
    --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$CONTAINERD_SOCK" \
    --pod-infra-container-image="$SANDBOX_IMAGE" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --root-dir="$k" --cert-dir="$k/pki" --seccomp-profile-root="$k/seccomp" --v=1
  log "kube-scheduler, kube-proxy"
  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$NODE_DIR/scheduler.kubeconfig" \
    --port=0 --secure-port=0 --leader-elect=false
  # --conntrack-*=0: leave the machine's conntrack settings alone.
  start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$NODE_DIR/proxy.kubeconfig" \
    --proxy-mode=iptables --cluster-cidr="$POD_CIDR" --hostname-override="$NODE_NAME" \
    --bind-address="$NODE_IP" --healthz-bind-address="$NODE_IP:10256" \
    --metrics-bind-address="$NODE_IP:10249" --conntrack-max-per-core=0 --conntrack-min=0 \
    --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0
  wait_for "node $NODE_NAME Ready" 240 node_ready
  # kube-proxy's rules for the kubernetes Service, then the guard back on top.
  wait_for kube-proxy 120 iptables -w -t nat -S KUBE-SERVICES
  guard_first
}

node_ready() {
  [ "$(kubectl --kubeconfig "$DIR/kubeconfig" get node "$NODE_NAME" \
      -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# Stops every pod, then the node's processes, then anything they left behind.
node_down() {
  node_paths
  [ -d "$NODE_DIR" ] || return 0
  stop_pid kube-scheduler
  if [ -e "$DIR/pids/kubelet" ] && kubectl --kubeconfig "$DIR/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
    # With the controllers stopped nothing replaces them; the kubelet stops each sandbox,
    # which tears down its network namespace and veth.
    kubectl --kubeconfig "$DIR/kubeconfig" delete pods --all --all-namespaces \
      --grace-period=2 --wait=false >/dev/null 2>&1 || true
    for _ in $(seq 60); do
      [ -z "$(ctr_ tasks ls -q 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  stop_pid kubelet
  stop_pid kube-proxy
  if [ -S "$CONTAINERD_SOCK" ]; then
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
  fi
  stop_pid containerd
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null || true
  # Container logs the kubelet wrote outside its root dir.
  local uid
  for uid in $(ls "$NODE_DIR/kubelet/pods" 2>/dev/null); do rm -rf /var/log/pods/*_"$uid"; done
  find /var/log/containers -maxdepth 1 -xtype l -delete 2>/dev/null || true
  # The kubelet's bind mount of its root dir, volume mounts, containerd's rootfs and shm mounts.
  local m
  for m in $(findmnt -rn -o TARGET | grep "^$NODE_DIR/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  umount -l "$NODE_DIR/kubelet" 2>/dev/null || true
  return 0
}

# check-isolation: fails (naming the rule or route) unless pod traffic cannot leave.
node_check_isolation() {
  node_paths
  local fail=0 fwd
  fwd=$(sysctl -n net.ipv4.ip_forward)
  [ "$fwd" = "$(sed -n 's/^net.ipv4.ip_forward=//p' "$NODE_DIR/sysctl.saved")" ] \
    || { log "ip_forward is $fwd, not the machine's own value"; fail=1; }
  guard_first_check || { log "FORWARD does not start with -j $GUARD"; fail=1; }
  if [ "$fwd" = 0 ] && ip route get 198.51.100.7 from 10.244.0.200 iif "$BRIDGE" >/dev/null 2>&1; then
    log "a pod address can be routed to an outside address"; fail=1
  fi
  if iptables -w -t nat -S | grep -E -- "-s $POD_CIDR .*MASQUERADE"; then
    log "pod traffic is masqueraded"; fail=1
  fi
  log "isolation: ip_forward=$fwd; $(ip route get 198.51.100.7 from 10.244.0.200 iif "$BRIDGE" 2>&1 | head -n1)" \
    "(pod → outside); guard packets dropped: $(iptables -w -L "$GUARD" -v -n -x | awk '$3 == "DROP" {n += $1} END {print n + 0}')"
  return "$fail"
}

guard_first_check() { [ "$(iptables -w -S FORWARD | sed -n 2p)" = "-A FORWARD -j $GUARD" ]; }

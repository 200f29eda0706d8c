# shellcheck shell=bash
# The testbed's certificates, sourced by e2e/testbed: one CA that signs the apiserver's
# serving certificate (the kubeconfig and every pod trust it) and the apiserver's client
# certificate for kubelets. Needs $DIR, $NODE_IP, $SERVICE_RANGE_FIRST_IP.

pki_up() {
  local pki="$DIR/pki"
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=blocksmith-testbed-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  cat >"$pki/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_RANGE_FIRST_IP
EOF
  pki_sign apiserver "/CN=kube-apiserver" "$pki/apiserver.ext"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
    >"$pki/client.ext"
  # The apiserver's identity towards kubelets (logs, exec): a cluster admin, as kubeadm's.
  pki_sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$pki/client.ext"
  # The aggregator's identity towards aggregated API servers (blocksmith's external metrics
  # API): a client certificate of a CA of its own, which they find in the ConfigMap
  # kube-system/extension-apiserver-authentication, as on kubeadm clusters.
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=blocksmith-testbed-front-proxy-ca" \
    -keyout "$pki/front-proxy-ca.key" -out "$pki/front-proxy-ca.crt" 2>/dev/null
  openssl req -new -newkey rsa:2048 -nodes -subj "/CN=front-proxy-client" \
    -keyout "$pki/front-proxy-client.key" -out "$pki/front-proxy-client.csr" 2>/dev/null
  openssl x509 -req -in "$pki/front-proxy-client.csr" -CA "$pki/front-proxy-ca.crt" \
    -CAkey "$pki/front-proxy-ca.key" -CAcreateserial -days 7 -extfile "$pki/client.ext" \
    -out "$pki/front-proxy-client.crt" 2>/dev/null
  rm -f "$pki/front-proxy-client.csr"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# pki_sign NAME SUBJECT EXTFILE: $DIR/pki/NAME.{key,crt} signed by the testbed CA.
pki_sign() {
  local pki="$DIR/pki" name=$1 subject=$2 ext=$3
  openssl req -new -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 7 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr"
}

random_token() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# kubeconfig FILE TOKEN: a kubeconfig for the testbed apiserver, verified against its CA.
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: https://$NODE_IP:$(cat "$DIR/apiserver.port")
    certificate-authority: $DIR/pki/ca.crt
users:
- name: user
  user:
    token: $2
contexts:
- name: testbed
  context: {cluster: testbed, user: user, namespace: default}
current-context: testbed
EOF
}

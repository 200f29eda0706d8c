//! A private kube-apiserver on the testbed's etcd under a key prefix of its own: a cluster of
//! its own for tests that restart the API server, so the tests running beside them never
//! notice. etcd keeps the data across restarts, as in a real control-plane restart.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::Testbed;
use crate::process::Proc;
use crate::procs::free_port;

pub struct PrivateApiserver {
    name: String,
    port: u16,
    proc: Proc,
    client: kube::Client,
}

fn var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: source the env of `e2e/testbed up`"))
}

impl PrivateApiserver {
    /// Starts the server, installs blocksmith's CRDs in it, and returns it with a copy of `tb`
    /// whose client and spawned binaries talk to it.
    pub async fn start(tb: &Testbed, name: &str) -> (PrivateApiserver, Testbed) {
        let current = crate::source_dir().join("../crds");
        Self::start_with_crds(tb, name, &current, CrdInstall::Apply).await
    }

    /// [`PrivateApiserver::start`] with the CRDs in directory `crds`, installed as `how` says.
    pub async fn start_with_crds(
        tb: &Testbed,
        name: &str,
        crds: &Path,
        how: CrdInstall,
    ) -> (PrivateApiserver, Testbed) {
        let dir = tb.dir.join("private-apiservers").join(name);
        std::fs::create_dir_all(&dir).expect("private apiserver dir");
        let port = free_port();
        let kubeconfig = dir.join("kubeconfig");
        let shared =
            std::fs::read_to_string(tb.dir.join("kubeconfig")).expect("testbed kubeconfig");
        let server = var("BLOCKSMITH_APISERVER");
        assert!(
            shared.contains(&server),
            "testbed kubeconfig names {server}"
        );
        std::fs::write(
            &kubeconfig,
            shared.replace(&server, &format!("https://127.0.0.1:{port}")),
        )
        .expect("write kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).expect("read kubeconfig"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("kubeconfig");
        let client = kube::Client::try_from(config).expect("client");
        let proc = spawn(tb, name, port);
        let server = PrivateApiserver {
            name: name.into(),
            port,
            proc,
            client: client.clone(),
        };
        server.wait_ready().await;
        install_crds(&client, crds, how).await;
        let private = Testbed {
            client,
            kubeconfig: Some(kubeconfig),
            ..tb.clone()
        };
        (server, private)
    }

    /// Stops the server (SIGKILL), leaves it down for `down`, starts it again on the same
    /// port and etcd prefix, and waits until it serves.
    pub async fn restart(&mut self, tb: &Testbed, down: Duration) {
        self.proc.kill();
        tokio::time::sleep(down).await;
        self.proc = spawn(tb, &self.name, self.port);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            match self.client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                other => panic!(
                    "private kube-apiserver {} not ready after 90 s: {other:?}; log {}",
                    self.name,
                    self.proc.log.display()
                ),
            }
        }
    }
}

fn spawn(tb: &Testbed, name: &str, port: u16) -> Proc {
    let pki = tb.dir.join("pki");
    // `--{flag}=<the testbed's pki directory>/{file}`.
    let pki_arg = |flag: &str, file: &str| format!("--{flag}={}", pki.join(file).display());
    let mut cmd =
        std::process::Command::new(Path::new(&var("BLOCKSMITH_KUBE_BIN")).join("kube-apiserver"));
    cmd.arg(format!("--etcd-servers={}", var("BLOCKSMITH_ETCD")))
        .arg(format!("--etcd-prefix=/private-{name}"))
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        // The testbed's serving certificate (its CA is in the kubeconfig; it names 127.0.0.1).
        .arg(pki_arg("tls-cert-file", "apiserver.crt"))
        .arg(pki_arg("tls-private-key-file", "apiserver.key"))
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(pki_arg("service-account-key-file", "sa.pub"))
        .arg(pki_arg("service-account-signing-key-file", "sa.key"))
        .arg(pki_arg("token-auth-file", "tokens.csv"))
        .arg("--authorization-mode=RBAC")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--insecure-port=0");
    tb.spawn(&format!("apiserver-{name}"), cmd)
}

/// How a private API server gets its CRDs.
#[derive(Clone, Copy, Debug)]
pub enum CrdInstall {
    /// Server-side apply, as the testbed installs them.
    Apply,
    /// Created by field manager `helm`, as `helm install` creates a chart's CRDs.
    CreateAsHelm,
}

async fn install_crds(client: &kube::Client, dir: &Path, how: CrdInstall) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for file in ["blockpipelines.yaml", "blockjobs.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("CRD yaml");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD yaml");
        let name = crd.metadata.name.clone().expect("CRD name");
        match how {
            CrdInstall::Apply => crds
                .patch(
                    &name,
                    &PatchParams::apply("blocksmith-testbed").force(),
                    &Patch::Apply(&crd),
                )
                .await
                .map(drop),
            CrdInstall::CreateAsHelm => crds
                .create(
                    &PostParams {
                        field_manager: Some("helm".into()),
                        ..Default::default()
                    },
                    &crd,
                )
                .await
                .map(drop),
        }
        .expect("install CRD");
        names.push(name);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in names {
        loop {
            let established = crds.get(&name).await.ok().is_some_and(|c| {
                c.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            assert!(Instant::now() < deadline, "CRD {name} not established");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Established is set before the resources are served.
    let pipelines: Api<blocksmith_crds::BlockPipeline> = Api::all(client.clone());
    while pipelines.list(&Default::default()).await.is_err() {
        assert!(Instant::now() < deadline, "BlockPipelines not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

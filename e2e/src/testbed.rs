//! A handle on the running testbed, read from the environment that `e2e/testbed up` writes
//! (or any cluster in `KUBECONFIG` plus a broker and S3 server named by the same variables).

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

use crate::process::Proc;

#[derive(Clone)]
pub struct Testbed {
    pub client: kube::Client,
    pub dir: PathBuf,
    pub kafka_bootstrap: String,
    pub kafka_control: String,
    pub s3_endpoint: String,
    pub s3_root: PathBuf,
    pub s3_bucket: String,
    pub python: PathBuf,
    /// Where blocksmith's binaries are (the cargo target dir of this test binary).
    pub bin_dir: PathBuf,
    /// The kubeconfig spawned binaries get, when not the testbed's (a private API server).
    pub kubeconfig: Option<PathBuf>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the e2e tests through `e2e/run-tests` (or source the env printed by `e2e/testbed up`)")
    })
}

impl Testbed {
    pub async fn get() -> Testbed {
        let client = kube::Client::try_default()
            .await
            .expect("kube client from KUBECONFIG");
        // target/<profile>/deps/<test> → target/<profile>, unless BLOCKSMITH_BIN_DIR names a
        // copy (so long runs are not disturbed by rebuilds).
        let bin_dir = match std::env::var_os("BLOCKSMITH_BIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => std::env::current_exe()
                .expect("test binary path")
                .parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .to_path_buf(),
        };
        Testbed {
            client,
            dir: PathBuf::from(var("BLOCKSMITH_TESTBED")),
            kafka_bootstrap: var("BLOCKSMITH_KAFKA_BOOTSTRAP"),
            kafka_control: var("BLOCKSMITH_KAFKA_CONTROL"),
            s3_endpoint: var("AWS_ENDPOINT"),
            s3_root: PathBuf::from(var("BLOCKSMITH_S3_ROOT")),
            s3_bucket: var("BLOCKSMITH_S3_BUCKET"),
            python: PathBuf::from(var("BLOCKSMITH_PYTHON")),
            bin_dir,
            kubeconfig: None,
        }
    }

    /// A fresh namespace for one test, so tests never see each other's objects.
    pub async fn namespace(&self, test: &str) -> String {
        let name = format!(
            "{}-{:06x}",
            test.replace('_', "-"),
            rand::random::<u32>() & 0xff_ffff
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        name
    }

    /// A unique topic name with the given partitions, created on the testbed broker.
    pub fn topic(&self, test: &str, partitions: i32) -> String {
        let topic = format!("{test}-{:08x}", rand::random::<u32>());
        crate::broker::create_topic(&self.kafka_control, &topic, partitions).expect("create topic");
        topic
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs").join("tests")
    }

    /// A command for one of blocksmith's binaries, with the testbed's environment.
    pub fn command(&self, binary: &str) -> Command {
        let path = self.bin_dir.join(binary);
        assert!(
            path.exists(),
            "{} missing: run `cargo build --workspace --bins` first",
            path.display()
        );
        let mut cmd = Command::new(path);
        if let Some(kubeconfig) = &self.kubeconfig {
            cmd.env("KUBECONFIG", kubeconfig);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd
    }

    pub fn spawn(&self, name: &str, cmd: Command) -> Proc {
        Proc::spawn(name, cmd, &self.logs_dir()).expect("spawn")
    }
}

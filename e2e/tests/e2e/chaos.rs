//! Seeded chaos: a pipeline runs while builders are SIGKILLed, the operator is restarted or
//! cut off from the kube-apiserver (it must stop leading, and is started again), the Kafka
//! broker and the S3 server are taken down (the first time for 45 s in runs of 500,000 records
//! or more: longer than the pipeline's `backoffLimit` of attempts would last if outages
//! counted; 20 s and 5–12 s in the suite's shorter runs), the kube-apiserver is restarted
//! and the tail job of a partition is deleted (a user's retry, in any phase); afterwards every
//! produced offset must be in exactly one block.
//!
//! `BLOCKSMITH_CHAOS_SEEDS` (comma-separated, default `1,2,3`) and `BLOCKSMITH_CHAOS_RECORDS`
//! (default 100,000) size the run. Each run has its own broker, S3 server and kube-apiserver
//! (on the testbed's etcd), so its faults do not disturb the other tests.

use std::time::{Duration, Instant};

use blocksmith_crds::BlockJob;
use blocksmith_crds::domain::default_consumer_group;
use blocksmith_e2e::Testbed;
use blocksmith_e2e::apiserver::PrivateApiserver;
use blocksmith_e2e::broker::PrivateBroker;
use blocksmith_e2e::datagen::{DataSpec, ValueSizes};
use blocksmith_e2e::forwarder::CuttableApiserver;
use blocksmith_e2e::process::Proc;
use blocksmith_e2e::scenario::*;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// The mock broker keeps ≤ 5 MiB or 100,000 message batches per partition: ~3.75 MB at most here.
const RECORDS_PER_PARTITION: u64 = 25_000;

struct Servers {
    broker: PrivateBroker,
    s3: PrivateS3,
}

fn chaos_builder(tb: &Testbed, ns: &str, id: &str, s3: &PrivateS3) -> Proc {
    spawn_builder_with(tb, ns, "p", id, s3.point())
}

/// An operator that reaches the API server through a forwarder the run can cut.
fn chaos_operator(tb: &Testbed, ns: &str, id: &str) -> (CuttableApiserver, Operator) {
    let (apiserver, via) = CuttableApiserver::start(tb, &format!("{ns}-{id}"));
    (apiserver, spawn_operator(&via, ns, id))
}

/// Deletes the job with the highest start of a random partition that has jobs: the tail
/// job, in whatever phase. Errors (the API server down meanwhile) skip it.
async fn delete_a_tail_job(tb: &Testbed, ns: &str, rng: &mut StdRng) -> bool {
    let api: Api<BlockJob> = Api::namespaced(tb.client.clone(), ns);
    let Ok(list) = api.list(&Default::default()).await else {
        return false;
    };
    let live: Vec<&BlockJob> = list.items.iter().filter(|j| !j.is_terminating()).collect();
    let Some(partition) = live.choose(rng).map(|j| j.spec.partition) else {
        return false;
    };
    let tail = live
        .iter()
        .filter(|j| j.spec.partition == partition)
        .max_by_key(|j| j.spec.start_offset)
        .expect("the partition has a job");
    api.delete(&tail.name_any(), &DeleteParams::default())
        .await
        .is_ok()
}

#[derive(Default, Debug)]
struct Faults {
    builder_kills: u32,
    operator_restarts: u32,
    broker_outages: u32,
    s3_outages: u32,
    apiserver_restarts: u32,
    leader_cutoffs: u32,
    /// Cut-off operators that were leading, stopped and exited on their own.
    leaders_stopped_by_themselves: u32,
    tail_job_deletions: u32,
    /// Processes that exited on their own and were started again, as a Deployment would.
    respawned: u32,
}

#[tokio::test]
async fn chaos_runs_lose_and_duplicate_nothing() {
    let seeds: Vec<u64> = std::env::var("BLOCKSMITH_CHAOS_SEEDS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("BLOCKSMITH_CHAOS_SEEDS: comma-separated integers")
        })
        .collect();
    let records: u64 = std::env::var("BLOCKSMITH_CHAOS_RECORDS")
        .ok()
        .map(|s| s.parse().expect("BLOCKSMITH_CHAOS_RECORDS"))
        .unwrap_or(100_000);
    let tb = Testbed::get().await;
    for seed in seeds {
        run(&tb, seed, records).await;
    }
}

async fn run(shared: &Testbed, seed: u64, records: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let partitions = records.div_ceil(RECORDS_PER_PARTITION).max(12) as i32;
    let tag = format!("chaos-{seed}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (mut apiserver, tb) = PrivateApiserver::start(shared, &tag).await;
    let tb = &tb;
    let ns = tb.namespace(&format!("chaos-{seed}")).await;
    let broker = PrivateBroker::spawn(tb, &ns);
    let s3_root = tb.dir.join(format!("{ns}-s3"));
    let mut servers = Servers {
        broker,
        s3: PrivateS3::spawn_at(tb, &format!("{ns}-s3"), s3_root),
    };

    servers.broker.create_topic("chaos", partitions);
    let spec = DataSpec {
        seed,
        value_sizes: ValueSizes::Fixed(100),
        ..DataSpec::new("chaos", partitions, records)
    };
    let produced = produce_data_to(&servers.broker.bootstrap, spec).await;

    // Four attempts: leases that run out (killed builders, API server restarts) count, so a
    // job must not lose many; outages must not count at all.
    let jobs = json!({"maxRecords": 1000, "leaseDurationSeconds": 4, "backoffLimit": 4});
    let mut bp = pipeline("p", "chaos", &servers.broker.bootstrap, "unset", jobs);
    servers.s3.serve(tb, &ns, &mut bp, "chaos").await;
    apply_pipeline(tb, &ns, &bp).await;
    let (mut operator_link, mut operator) = chaos_operator(tb, &ns, "op-0");
    let mut builders: Vec<Proc> = (0..3)
        .map(|i| chaos_builder(tb, &ns, &format!("b{i}-0"), &servers.s3))
        .collect();

    let want = high_watermarks(&produced);
    let group = default_consumer_group(&ns, "p");
    let mut faults = Faults::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300 + records / 2500);
    let mut generation = 0;
    let mut first_faults = [0, 1, 2, 3, 4, 5, 6];
    // The suite's short runs leave long outages to `outages.rs`.
    let long_outage = (records >= 500_000).then_some(45);
    first_faults.shuffle(&mut rng);
    loop {
        // Faults go on for 40 s to 2 min by size, and until each kind happened once; then
        // the run must finish.
        let fault_window = Duration::from_secs((records / 5000).clamp(40, 120));
        if started.elapsed() < fault_window || generation < first_faults.len() {
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
            // Every kind of fault once, in a seeded order, then at random.
            let kind = first_faults
                .get(generation)
                .copied()
                .unwrap_or_else(|| rng.random_range(0..7));
            generation += 1;
            match kind {
                0 => {
                    let i = rng.random_range(0..builders.len());
                    builders[i].kill();
                    builders[i] =
                        chaos_builder(tb, &ns, &format!("b{i}-{generation}"), &servers.s3);
                    faults.builder_kills += 1;
                }
                1 => {
                    operator.proc.kill();
                    (operator_link, operator) =
                        chaos_operator(tb, &ns, &format!("op-{generation}"));
                    faults.operator_restarts += 1;
                }
                2 => {
                    servers.broker.down();
                    // The first outage is long (20 s in short runs); later ones 5–20 s.
                    let down = match faults.broker_outages {
                        0 => long_outage.unwrap_or(20),
                        _ => rng.random_range(5..=20),
                    };
                    tokio::time::sleep(Duration::from_secs(down)).await;
                    servers.broker.up();
                    faults.broker_outages += 1;
                }
                3 => {
                    servers.s3.kill();
                    let down = match (faults.s3_outages, long_outage) {
                        (0, Some(long)) => long,
                        _ => rng.random_range(5..12),
                    };
                    tokio::time::sleep(Duration::from_secs(down)).await;
                    servers.s3.start();
                    faults.s3_outages += 1;
                }
                4 => {
                    let down = Duration::from_secs(rng.random_range(3..10));
                    apiserver.restart(tb, down).await;
                    faults.apiserver_restarts += 1;
                }
                // A leader stops leading by itself and exits (within 5 s of a 6 s lease); one
                // cut off before it led (waiting out its predecessor's lease) waits on and is
                // replaced, as a Deployment's second replica would take over.
                5 => {
                    operator_link.cut();
                    let cut_at = Instant::now();
                    while operator.proc.is_running() && cut_at.elapsed() < Duration::from_secs(10) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    if operator.proc.is_running() {
                        operator.proc.kill();
                    } else {
                        faults.leaders_stopped_by_themselves += 1;
                    }
                    (operator_link, operator) =
                        chaos_operator(tb, &ns, &format!("op-{generation}"));
                    faults.leader_cutoffs += 1;
                }
                _ => {
                    if delete_a_tail_job(tb, &ns, &mut rng).await {
                        faults.tail_job_deletions += 1;
                    }
                }
            }
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // An operator that lost its leader lease (the API server down, or cut off from it)
        // exits.
        if !operator.proc.is_running() {
            (operator_link, operator) = chaos_operator(tb, &ns, &format!("op-r{generation}"));
            faults.respawned += 1;
        }
        for (i, b) in builders.iter_mut().enumerate() {
            if !b.is_running() {
                *b = chaos_builder(tb, &ns, &format!("b{i}-r{generation}"), &servers.s3);
                faults.respawned += 1;
            }
        }
        let c = group_offsets(&servers.broker.bootstrap, &group, "chaos", partitions).await;
        for (p, o) in &c {
            assert!(
                *o <= want[p],
                "partition {p} committed {o} past its high watermark {}",
                want[p]
            );
        }
        if c == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: not everything committed in time: {c:?} of {want:?}; faults {faults:?}"
        );
    }

    let (report, exact) = audit_produced(tb, &servers.s3.dir("chaos"), &produced, Some(&want));
    println!(
        "chaos seed {seed}: {records} records, faults {faults:?}, {:.0} s; missing {} duplicated {} problems {}",
        started.elapsed().as_secs_f64(),
        report["missing"],
        report["duplicated"],
        report["problems"]
    );
    assert!(exact, "seed {seed}: audit not exact: {report}");
    servers.broker.proc.kill();
}

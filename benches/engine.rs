//! Engine benchmarks: `plan` of a 1,000-instance sweep, a no-op rerun of it (everything cached), and
//! the hashing throughput of a large file against a reference measured in the same run (`b3sum` when
//! it is on PATH, otherwise in-memory blake3 of the same bytes, which bounds what reading can reach).
//!
//! Run with `make bench` (or `cargo bench --bench engine`).

use std::path::Path;
use std::time::Instant;

use criterion::Criterion;
use eoss::exec::{Event, EventSink, RunOptions, Status};
use eoss::expand::Overrides;
use eoss::graph::{self, Plan};
use eoss::stages::Registry;
use eoss::store::Store;

/// 1,000 tiny synthetic datasets.
fn sweep_text() -> String {
    let seeds: Vec<String> = (0..1000).map(|s| s.to_string()).collect();
    format!(
        "name: bench\nstages:\n  data:\n    kind: dataset\n    params: {{source: synthetic, n: 4, synthetic: {{channels: 1, height: 2, width: 2, num_classes: 2, train_size: 8, test_size: 4}}}}\n    matrix: {{seed: [{}]}}\n",
        seeds.join(", ")
    )
}

struct Silent;
impl EventSink for Silent {
    fn event(&self, _: &Plan, _: Event) {}
}

fn plan(text: &str, store: &Store) -> Plan {
    let p = eoss::spec::parse(Path::new("bench.yaml"), text.to_string()).expect("valid pipeline");
    graph::build(&p, &Overrides::default(), &Registry::builtin(), store).expect("valid plan")
}

fn engine(c: &mut Criterion, store: &Store) {
    let text = sweep_text();
    c.bench_function("plan 1000-instance sweep", |b| {
        b.iter(|| plan(&text, store))
    });
    let p = plan(&text, store);
    assert_eq!(p.stages.len(), 1000);
    let opts = RunOptions {
        jobs: 2,
        host: "bench".into(),
    };
    let first = eoss::exec::run(&p, store, &opts, &Silent);
    assert!(first.iter().all(|o| o.status == Status::Computed));
    c.bench_function("no-op rerun of 1000 instances (plan + run)", |b| {
        b.iter(|| {
            let p = plan(&text, store);
            let out = eoss::exec::run(&p, store, &opts, &Silent);
            assert!(out.iter().all(|o| o.status == Status::Cached));
        })
    });
}

fn hashing(dir: &Path) {
    const SIZE: usize = 512 << 20;
    let path = dir.join("large.bin");
    let data: Vec<u8> = (0..SIZE)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).expect("write the test file");
    let gbps = |secs: f64| SIZE as f64 / secs / 1e9;
    // Warm the page cache, then take the best of three.
    let best = |f: &mut dyn FnMut()| {
        f();
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let ours = best(&mut || {
        eoss::store::hash::hash_file(&path).expect("hash");
    });
    let b3sum = std::process::Command::new("b3sum")
        .arg("--version")
        .output()
        .is_ok();
    let (name, reference) = if b3sum {
        let t = best(&mut || {
            let out = std::process::Command::new("b3sum")
                .arg(&path)
                .output()
                .expect("b3sum");
            assert!(out.status.success());
        });
        ("b3sum", t)
    } else {
        (
            "in-memory blake3::hash (b3sum is not on PATH)",
            best(&mut || {
                std::hint::black_box(blake3::hash(&data));
            }),
        )
    };
    println!(
        "hash 512 MiB file: eoss {:.2} GB/s; reference {name}: {:.2} GB/s; ratio {:.2}x",
        gbps(ours),
        gbps(reference),
        ours / reference
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("store")).expect("store");
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    engine(&mut c, &store);
    c.final_summary();
    hashing(dir.path());
}

//! Vault micro-benchmarks: sealing/opening one key, fingerprinting.
//! Run with: `cargo bench -p apipool-server --bench vault`

use apipool_server::vault::{MasterKey, open_with, seal_with};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (vault, sk) = rt.block_on(async {
        let db = apipool_server::db::Db::connect(
            &apipool_server::db::Db::sqlite_url(&dir.path().join("b.db")),
            2,
        )
        .await
        .expect("db");
        let v = apipool_server::vault::Vault::open(
            db,
            apipool_server::vault::KeySource::File(dir.path().join("master.key")),
            0,
        )
        .await
        .expect("vault");
        let sk = v.sealing_key().await.expect("key");
        (v, sk)
    });
    let raw = b"sk-proj-0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCD";
    c.bench_function("seal one key (new DEK + 2x AES-256-GCM)", |b| {
        b.iter(|| seal_with(&sk, "key:3f0c1a8e-0000-4000-8000-000000000000", raw))
    });
    let sealed = seal_with(&sk, "key:x", raw);
    let mk: MasterKey = rt.block_on(vault.master_key(sk.version)).expect("mk");
    c.bench_function("open one key", |b| {
        b.iter(|| open_with(&mk, "key:x", &sealed))
    });
    c.bench_function("fingerprint (HMAC-SHA256)", |b| {
        b.iter(|| vault.fingerprint(raw))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

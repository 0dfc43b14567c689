//! The baseline of `scripts/bench/s3.py`: PUTs COUNT objects of SIZE bytes of random-looking
//! data below `s3://BUCKET/PREFIX`, STREAMS requests in flight, with `object_store` configured
//! from the same `AWS_*` variables as the repository; prints the elapsed milliseconds.
//!
//! `cargo run --release -p snapshot --example s3_put -- s3://BUCKET/PREFIX COUNT SIZE STREAMS`

use std::time::Instant;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() != 5 {
        return Err("usage: s3_put s3://BUCKET/PREFIX COUNT SIZE STREAMS".into());
    }
    let rest = argv[1].strip_prefix("s3://").ok_or("not an s3:// URL")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, "bench"));
    let (count, size, streams): (usize, usize, usize) =
        (argv[2].parse()?, argv[3].parse()?, argv[4].parse()?);
    let store = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(std::env::var("AWS_ENDPOINT_URL")?)
        .with_access_key_id(std::env::var("AWS_ACCESS_KEY_ID")?)
        .with_secret_access_key(std::env::var("AWS_SECRET_ACCESS_KEY")?)
        .with_region(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()))
        .with_allow_http(true)
        .build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Each object its own bytes (a counter hashed), so nothing compresses or deduplicates.
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let mut out = vec![0u8; size];
            blake3::Hasher::new()
                .update(&(i as u64).to_le_bytes())
                .finalize_xof()
                .fill(&mut out);
            out
        })
        .collect();
    let started = Instant::now();
    runtime.block_on(async {
        let results: Vec<_> = futures_util::stream::iter(bodies.into_iter().enumerate())
            .map(|(i, body)| {
                let store = &store;
                let path = Path::from(format!("{prefix}/obj-{i:06}"));
                async move { store.put(&path, PutPayload::from(body)).await }
            })
            .buffer_unordered(streams.max(1))
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<_>, _>>()
    })?;
    println!("{}", started.elapsed().as_millis());
    Ok(())
}

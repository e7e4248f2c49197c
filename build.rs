//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.
use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/coresdk/v1/problem.proto",
        "proto/coresdk/v1/flags.proto",
        "proto/coresdk/v1/webhook.proto",
        "proto/coresdk/v1/audit.proto",
        "proto/coresdk/v1/tenants.proto",
        "proto/coresdk/v1/auth.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Server reflection serves this set, so grpcurl needs no local .proto files.
    fs::write(
        out_dir.join("coresdk_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    // flagd's published protocol, kept apart so reflection on the main port lists only what
    // that port serves.
    let flagd = protox::compile(
        [
            "proto/flagd/evaluation/v1/evaluation.proto",
            "proto/flagd/evaluation/v2/evaluation.proto",
        ],
        ["proto"],
    )?;
    fs::write(out_dir.join("flagd_descriptor.bin"), flagd.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(flagd)?;
    // The sync service has a listener of its own, and its reflection lists only it.
    let flagd_sync = protox::compile(["proto/flagd/sync/v1/sync.proto"], ["proto"])?;
    fs::write(
        out_dir.join("flagd_sync_descriptor.bin"),
        flagd_sync.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(flagd_sync)?;
    Ok(())
}

//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs no
//! system `protoc`, and writes the file descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/countersign/v1/types.proto",
        "proto/countersign/v1/action_gate.proto",
        "proto/countersign/v1/review.proto",
        "proto/countersign/v1/audit.proto",
        "proto/countersign/v1/policy.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    // Includes the imported well-known types, which reflection clients need too.
    let descriptors = protox::compile(protos, ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("countersign_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    // `prost::Name` impls let the strict codec find a request's schema by its full name.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Decodes requests only after checking them for fields this server does not know.
        .codec_path("crate::api::strict::StrictCodec")
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}

//! Compiles the public proto with protox (pure Rust), so a fresh machine needs no system `protoc`.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/channelgateway/v1/gateway.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The same descriptor set feeds server reflection, so clients see exactly what we compiled.
    std::fs::write(
        out.join("channelgateway_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // A message's address is 440 of its 976 bytes: boxed, decoding a batch (whose Vec
        // grows by copying every message) and each move of a message copy half as much.
        .boxed(".channelgateway.v1.Message.address")
        // A request that does not decode is the caller's error, not an internal one.
        .codec_path("crate::api::codec::GatewayCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

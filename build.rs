//! Compiles canaryd's own protobuf API (proto/canaryd/v1/events.proto) with protox, a pure-Rust
//! protobuf compiler, so that building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["canaryd/v1/events.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

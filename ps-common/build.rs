//! Compiles `proto/ps.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ps.proto");
    let fds = protox::compile(["ps.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".ps.v1")
        .compile_fds(fds)?;
    Ok(())
}

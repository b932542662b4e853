//! Compiles `proto/ps.proto` (our API) and `proto/etcd.proto` (the part of
//! etcd's v3 API the coordinator speaks) with protox (pure Rust), so no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ps.proto");
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let fds = protox::compile(["ps.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".ps.v1")
        // Encodes each message into one allocation of its length (src/codec.rs).
        .codec_path("crate::codec::ReservingCodec")
        .compile_fds(fds)?;
    let etcd = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}

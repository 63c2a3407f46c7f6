//! The identity service binary: see the crate documentation in lib.rs.

fn main() -> anyhow::Result<()> {
    tessera_common::cli::service_main("identity", tessera_identity::run)
}

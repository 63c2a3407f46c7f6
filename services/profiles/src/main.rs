//! The profiles service binary: see the crate documentation in lib.rs.

fn main() -> anyhow::Result<()> {
    tessera_common::cli::service_main("profiles", tessera_profiles::run)
}

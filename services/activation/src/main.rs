//! The activation service binary: see the crate documentation in lib.rs.

fn main() -> anyhow::Result<()> {
    tessera_common::cli::service_main("activation", tessera_activation::run)
}

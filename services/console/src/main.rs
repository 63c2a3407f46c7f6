//! The console binary: see the crate documentation in lib.rs.

fn main() -> anyhow::Result<()> {
    tessera_common::cli::service_main_checked(
        "console",
        tessera_console::check,
        tessera_console::run,
    )
}

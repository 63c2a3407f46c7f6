//! The profiles service binary: see the crate documentation in lib.rs.

fn main() -> anyhow::Result<()> {
    tessera_common::cli::service_main_checked(
        "profiles",
        |c| {
            tessera_profiles::catalog::load_dir(&c.profiles.definitions_dir)
                .map(|_| ())
                .map_err(tessera_common::Error::Config)
        },
        tessera_profiles::run,
    )
}

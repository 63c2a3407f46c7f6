//! The identity service binary: see the crate documentation in lib.rs.

fn main() -> anyhow::Result<()> {
    tessera_common::cli::service_main_checked(
        "identity",
        |c| tessera_identity::rules::Rules::load(&c.identity.rules_file).map(|_| ()),
        tessera_identity::run,
    )
}

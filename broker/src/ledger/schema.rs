//! Schema migrations of the ledger, embedded at compile time from `broker/migrations/{sqlite,postgres}/` and
//! applied with sqlx's migrator (checksummed; on PostgreSQL under an advisory lock, so brokers starting
//! together do not race).

use std::borrow::Cow;

use sqlx::AnyPool;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::Dialect;
use super::error::LedgerError;

const SQLITE: &[(i64, &str, &str)] = &[
    (1, "ledger", include_str!("../../migrations/sqlite/0001_ledger.sql")),
    (2, "images stations", include_str!("../../migrations/sqlite/0002_images_stations.sql")),
    (3, "station control", include_str!("../../migrations/sqlite/0003_station_control.sql")),
    (4, "licence holders", include_str!("../../migrations/sqlite/0004_licence_holders.sql")),
    (5, "ledger id", include_str!("../../migrations/sqlite/0005_ledger_id.sql")),
    (6, "audit checkpoints", include_str!("../../migrations/sqlite/0006_audit_checkpoints.sql")),
    (7, "refusals", include_str!("../../migrations/sqlite/0007_refusals.sql")),
    (8, "leases", include_str!("../../migrations/sqlite/0008_leases.sql")),
    (9, "sites", include_str!("../../migrations/sqlite/0009_sites.sql")),
];
const POSTGRES: &[(i64, &str, &str)] = &[
    (1, "ledger", include_str!("../../migrations/postgres/0001_ledger.sql")),
    (2, "images stations", include_str!("../../migrations/postgres/0002_images_stations.sql")),
    (3, "station control", include_str!("../../migrations/postgres/0003_station_control.sql")),
    (4, "licence holders", include_str!("../../migrations/postgres/0004_licence_holders.sql")),
    (5, "ledger id", include_str!("../../migrations/postgres/0005_ledger_id.sql")),
    (6, "audit checkpoints", include_str!("../../migrations/postgres/0006_audit_checkpoints.sql")),
    (7, "refusals", include_str!("../../migrations/postgres/0007_refusals.sql")),
    (8, "leases", include_str!("../../migrations/postgres/0008_leases.sql")),
    (9, "sites", include_str!("../../migrations/postgres/0009_sites.sql")),
];

fn migrator(dialect: Dialect) -> Migrator {
    let set = match dialect {
        Dialect::Sqlite => SQLITE,
        Dialect::Postgres => POSTGRES,
    };
    let migrations = set
        .iter()
        .map(|&(v, d, sql)| Migration::new(v, Cow::Borrowed(d), MigrationType::Simple, Cow::Borrowed(sql), false))
        .collect::<Vec<_>>();
    Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false }
}

/// Applies every pending migration for `dialect`.
pub(crate) async fn migrate(pool: &AnyPool, dialect: Dialect) -> Result<(), LedgerError> {
    migrator(dialect).run(pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_define_the_same_tables() {
        let tables =
            |sql: &str| sql.lines().filter(|l| l.starts_with("CREATE TABLE")).map(str::to_owned).collect::<Vec<_>>();
        for (s, p) in SQLITE.iter().zip(POSTGRES) {
            assert_eq!(tables(s.2), tables(p.2));
            assert_eq!(s.0, p.0);
        }
        assert_eq!(SQLITE.len(), POSTGRES.len());
    }
}

//! Integration tests of the stats collector, over real connections: a SQLite file, PostgreSQL and
//! MariaDB (URLs from `APIPOOL_TEST_POSTGRES_URL` / `APIPOOL_TEST_MYSQL_URL`, defaults
//! `postgres://postgres@127.0.0.1:5432/test` and `mysql://root@127.0.0.1:3306/test`). Every test
//! creates its own database with a random name and drops it at the end.
//!
//! Run with: `cargo nextest run --workspace -E 'package(apipool) and binary(stats)'`

mod errors;
mod local;
mod outage;
mod suite;
mod support;

/// The same suite for each backend.
macro_rules! backend_tests {
    ($module:ident, $backend:expr) => {
        mod $module {
            use crate::suite;
            use crate::support::Backend;

            #[test]
            fn eight_threads_write_exactly_400k() {
                suite::eight_threads_write_exactly_400k($backend);
            }

            #[test]
            fn queries_are_exact_on_hand_built_data() {
                suite::queries_are_exact_on_hand_built_data($backend);
            }

            #[test]
            fn timestamps_round_trip_in_utc() {
                suite::timestamps_round_trip_in_utc($backend);
            }

            #[test]
            fn dedup_ids_are_stored_once() {
                suite::dedup_ids_are_stored_once($backend);
            }

            #[test]
            fn newer_schema_is_refused() {
                suite::newer_schema_is_refused($backend);
            }

            #[test]
            fn status_table_is_seeded() {
                suite::status_table_is_seeded($backend);
            }

            #[test]
            fn retention_prunes_by_age_and_rows() {
                suite::retention_prunes_by_age_and_rows($backend);
            }

            #[test]
            fn drop_flushes() {
                suite::drop_flushes($backend);
            }

            #[tokio::test(flavor = "current_thread")]
            async fn async_api_inside_a_runtime() {
                suite::async_api_inside_a_runtime($backend).await;
            }
        }
    };
}

backend_tests!(sqlite_file, Backend::SqliteFile);
backend_tests!(postgres, Backend::Postgres);
backend_tests!(mariadb, Backend::MySql);

//! Integration tests: the real app on a random port, on SQLite and on PostgreSQL.
//! Run: `cargo nextest run --workspace -E 'package(apipool-server)'`
//! (PostgreSQL at APIPOOL_TEST_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test).

mod attacker;
mod auth;
mod faults;
mod health;
mod helpers;
mod import;
mod keys;
mod load;
mod pools;
mod proxy;
mod proxy_engine;
mod proxy_helpers;
mod proxy_security;
mod replicas;
mod rotation;
mod secrets;
mod stats_api;
mod users;

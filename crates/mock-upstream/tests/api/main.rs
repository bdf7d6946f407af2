//! Integration tests: each test starts the real mock on 127.0.0.1:0 and talks to it with reqwest.

mod auth;
mod binary;
mod endpoints;
mod faults;
mod helpers;
mod runtime_config;
mod window;

//! Dashboard tests: HTTP-level checks of sessions, CSRF, isolation and headers (`http`), and the
//! whole flow in headless Chromium driven through chromedriver (`browser`).
//!
//! The browser test needs Debian's `chromium` and `chromium-driver` packages
//! (`apt-get install -y --no-install-recommends chromium chromium-driver`); it fails with that
//! message when they are missing. Screenshots land in `target/dashboard-screenshots/`.

mod actions;
mod attacker;
mod browser;
mod helpers;
mod http;

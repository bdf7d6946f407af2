//! The overview: every pool with its usable/total keys, calls and success rate over 24 hours,
//! and a calls-per-minute chart.

use std::collections::BTreeMap;

use askama::Template;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::forms::seg;
use super::pages::{Ctx, PageResult, render};
use super::pools::{live_status, pct, rates, timeline_points};
use super::session::DashUser;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extractor::{AppQuery, AuthUser};
use crate::http::pools::list_pools;
use crate::http::types::PageParams;

/// Pools shown on the overview (the pools page pages through the rest).
const MAX_POOLS: i64 = 100;

/// A pool row of the overview.
pub(crate) struct Row {
    identifier: String,
    href: String,
    name: String,
    usable: String,
    calls: u64,
    success: String,
    is_active: bool,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    ctx: Ctx,
    rows: Vec<Row>,
    total_pools: i64,
    calls: u64,
    success: String,
    usable: usize,
    keys: usize,
}

async fn pool_ids(
    state: &AppState,
    user: &AuthUser,
) -> Result<(Vec<(String, String, bool)>, i64), ApiError> {
    let page = list_pools(
        State(state.clone()),
        user.clone(),
        AppQuery(PageParams {
            page: Some(1),
            page_size: Some(MAX_POOLS),
        }),
    )
    .await?
    .0;
    Ok((
        page.items
            .into_iter()
            .map(|p| (p.identifier, p.name, p.is_active))
            .collect(),
        page.total,
    ))
}

/// `GET /`.
pub(crate) async fn overview(State(state): State<AppState>, du: DashUser) -> PageResult {
    let (pools, total_pools) = pool_ids(&state, &du.user).await?;
    let mut rows = Vec::with_capacity(pools.len());
    let (mut calls, mut successes, mut usable, mut keys) = (0u64, 0u64, 0usize, 0usize);
    for (identifier, name, is_active) in pools {
        let live = live_status(&state, &du.user, &identifier).await;
        let day = rates(&state, &du.user, &identifier, 86_400).await;
        if let Some(l) = &live {
            usable += l.pool_available;
            keys += l.data.total_keys;
        }
        let c = day.as_ref().map_or(0, |d| d.counts.total);
        calls += c;
        successes += day.as_ref().map_or(0, |d| d.counts.success);
        rows.push(Row {
            href: format!("/pools/{}", seg(&identifier)),
            usable: live.map_or_else(
                || "–".to_owned(),
                |l| format!("{} / {}", l.pool_available, l.data.total_keys),
            ),
            calls: c,
            success: pct(day.as_ref().and_then(|d| d.counts.success_rate)),
            identifier,
            name,
            is_active,
        });
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = (calls > 0).then(|| successes as f64 / calls as f64);
    Ok(render(&OverviewPage {
        ctx: Ctx::new(&du, "overview", "Overview"),
        rows,
        total_pools,
        calls,
        success: pct(rate),
        usable,
        keys,
    }))
}

#[derive(Debug, Serialize)]
pub(crate) struct OverviewJson {
    window: u64,
    interval_ms: u64,
    now: String,
    timeline: Vec<Point>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Point {
    start: String,
    total: u64,
    success: u64,
    failed: u64,
}

/// `GET /overview.json`: calls per minute over the last hour, all pools together.
pub(crate) async fn overview_json(State(state): State<AppState>, du: DashUser) -> Response {
    let result: Result<OverviewJson, ApiError> = async {
        let (pools, _) = pool_ids(&state, &du.user).await?;
        let mut sum: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for (identifier, _, _) in pools {
            let (_, points) = timeline_points(&state, &du.user, &identifier, 3600).await?;
            for p in points {
                let e = sum.entry(p.start.clone()).or_default();
                e.0 += p.total;
                e.1 += p.success;
                e.2 += p.failed;
            }
        }
        Ok(OverviewJson {
            window: 3600,
            interval_ms: 60_000,
            // Statistics are stamped with the system clock; the charts end at its "now".
            now: crate::clock::format_ms(crate::clock::unix_ms(time::OffsetDateTime::now_utc())),
            timeline: sum
                .into_iter()
                .map(|(start, (total, success, failed))| Point {
                    start,
                    total,
                    success,
                    failed,
                })
                .collect(),
        })
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

//! Users page (admins only): list, create, enable/disable, change role.

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use secrecy::SecretString;
use serde::Deserialize;

use super::forms::{FieldErrors, query};
use super::pages::{Ctx, PageResult, render_status};
use super::session::{DashUser, redirect_with};
use crate::http::AppState;
use crate::http::auth::{RegisterRequest, UserOut};
use crate::http::error::ApiError;
use crate::http::extractor::{AdminUser, AppJson, AppPath, AppQuery, MaybeAuthUser};
use crate::http::types::PageParams;
use crate::http::users::{self as api, UserUpdate};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct CreateForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    role: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    page: String,
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    ctx: Ctx,
    me: String,
    items: Vec<UserOut>,
    total: i64,
    page: i64,
    pages: i64,
    prev_url: Option<String>,
    next_url: Option<String>,
    form: CreateForm,
    errors: FieldErrors,
}

fn admin(du: &DashUser) -> Result<AdminUser, ApiError> {
    if du.user.is_admin() {
        Ok(AdminUser(du.user.clone()))
    } else {
        Err(ApiError::Forbidden(
            "Only administrators can manage users.".to_owned(),
        ))
    }
}

async fn users_page(
    state: &AppState,
    du: &DashUser,
    page: i64,
    form: CreateForm,
    errors: FieldErrors,
    status: StatusCode,
) -> PageResult {
    let size = 50;
    let res = api::list_users(
        State(state.clone()),
        admin(du)?,
        AppQuery(PageParams {
            page: Some(page),
            page_size: Some(size),
        }),
    )
    .await?
    .0;
    let pages = ((res.total + size - 1) / size).max(1);
    let link = |p: i64| format!("/users{}", query(&[("page", p.to_string())]));
    let view = UsersPage {
        ctx: Ctx::new(du, "users", "Users"),
        me: du.user.id.clone(),
        prev_url: (res.page > 1).then(|| link(res.page - 1)),
        next_url: (res.page < pages).then(|| link(res.page + 1)),
        items: res.items,
        total: res.total,
        page: res.page,
        pages,
        form,
        errors,
    };
    Ok(render_status(status, &view))
}

/// `GET /users`.
pub(crate) async fn list(
    State(state): State<AppState>,
    du: DashUser,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let page = q.page.trim().parse().unwrap_or(1).clamp(1, 1_000_000);
    users_page(
        &state,
        &du,
        page,
        CreateForm::default(),
        FieldErrors::new(),
        StatusCode::OK,
    )
    .await
}

/// `POST /users`: create an account (the API's registration, as an admin).
pub(crate) async fn create(
    State(state): State<AppState>,
    du: DashUser,
    Form(f): Form<CreateForm>,
) -> PageResult {
    let AdminUser(me) = admin(&du)?;
    let body = RegisterRequest {
        username: f.username.trim().to_owned(),
        email: f.email.trim().to_owned(),
        password: SecretString::from(f.password.clone()),
        role: Some(if f.role == "admin" { "admin" } else { "user" }.to_owned()),
    };
    match crate::http::auth::register(State(state.clone()), MaybeAuthUser(Some(me)), AppJson(body))
        .await
    {
        Ok((_, u)) => Ok(redirect_with(
            "/users",
            "ok",
            &format!("User '{}' created.", u.username),
        )),
        Err(e) => {
            let Some(mut errors) =
                FieldErrors::from_api(&e, &["username", "email", "password", "role"])
            else {
                return Err(e.into());
            };
            if let ApiError::Conflict(m) = &e {
                errors.general = None;
                errors.add("username", m.clone());
            }
            let form = CreateForm {
                password: String::new(),
                ..f
            };
            users_page(
                &state,
                &du,
                1,
                form,
                errors,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct UpdateForm {
    is_active: Option<String>,
    role: Option<String>,
}

/// `POST /users/{id}/update`: enable/disable or change the role.
pub(crate) async fn update(
    State(state): State<AppState>,
    du: DashUser,
    Path(id): Path<String>,
    Form(f): Form<UpdateForm>,
) -> PageResult {
    let body = UserUpdate {
        is_active: f.is_active.as_deref().map(|v| v == "true"),
        role: f.role,
    };
    match api::update_user(State(state), admin(&du)?, AppPath(id), AppJson(body)).await {
        Ok(u) => Ok(redirect_with(
            "/users",
            "ok",
            &format!("User '{}' updated.", u.username),
        )),
        Err(ApiError::Unprocessable(m)) => Ok(redirect_with("/users", "error", &m)),
        Err(e) => Err(e.into()),
    }
}

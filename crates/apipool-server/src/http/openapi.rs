//! Completes the generated OpenAPI document with what every operation shares, so clients and
//! API fuzzers (schemathesis runs in CI against it) see every status the server can send:
//!
//! * the errors our extractors answer before a handler runs: 400 (malformed JSON or path), 415
//!   (a body without `Content-Type: application/json`), 422 (invalid fields or query), and 401
//!   on operations that need a token (403 on the admin's), each as `{"detail": ...}`;
//! * every documented error may also be that `{"detail"}` body (an extractor can refuse the
//!   request before the handler that documents a richer error body runs);
//! * response links from `POST /keys` and `POST /pools` to the operations addressing the new
//!   resource, by its `identifier` (not its `id`).

use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::AnyOfBuilder;
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder, Schema};

const ERROR_SCHEMA: &str = "#/components/schemas/ErrorBody";

fn operations_mut(item: &mut utoipa::openapi::PathItem) -> Vec<(&'static str, &mut Operation)> {
    [
        ("get", item.get.as_mut()),
        ("put", item.put.as_mut()),
        ("post", item.post.as_mut()),
        ("delete", item.delete.as_mut()),
        ("options", item.options.as_mut()),
        ("head", item.head.as_mut()),
        ("patch", item.patch.as_mut()),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.map(|op| (m, op)))
    .collect()
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::new(ERROR_SCHEMA)))
                    .build(),
            )
            .build(),
    )
}

/// Lets an error response's body also be the generic `{"detail"}` shape.
fn also_error_body(resp: &mut RefOr<utoipa::openapi::Response>) {
    let RefOr::T(resp) = resp else { return };
    for content in resp.content.values_mut() {
        let RefOr::T(content) = content else { continue };
        let Some(schema) = content.schema.take() else {
            continue;
        };
        let is_error = matches!(&schema, RefOr::Ref(r) if r.ref_location == ERROR_SCHEMA);
        content.schema = Some(if is_error {
            schema
        } else {
            RefOr::T(Schema::AnyOf(
                AnyOfBuilder::new()
                    .item(schema)
                    .item(Ref::new(ERROR_SCHEMA))
                    .build(),
            ))
        });
    }
}

/// Adds the shared error responses and the creation links (see the module docs).
pub(crate) fn complete(doc: &mut OpenApi) {
    let mut key_ops = Vec::new();
    let mut pool_ops = Vec::new();
    for (path, item) in &mut doc.paths.paths {
        let api = path.starts_with("/api/v1/") && path != "/api/v1/health";
        for (_, op) in operations_mut(item) {
            if let Some(id) = op.operation_id.clone() {
                if path.starts_with("/api/v1/keys/{identifier}") {
                    key_ops.push(id);
                } else if path.contains("/{pool}") {
                    pool_ops.push(id);
                }
            }
            if !api {
                continue;
            }
            let has_body = op.request_body.is_some();
            let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty())
                || path.starts_with("/api/v1/auth/");
            let responses = &mut op.responses.responses;
            for (status, resp) in responses.iter_mut() {
                if status.starts_with('4') || status.starts_with('5') {
                    also_error_body(resp);
                }
            }
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error_response(description));
            };
            if secured {
                add("401", "Missing, invalid or expired access token");
            }
            if path.starts_with("/api/v1/users") || path == "/api/v1/auth/register" {
                add("403", "Admin role required");
            }
            if has_body || has_params {
                add("400", "Malformed request (JSON syntax, path encoding)");
                add("422", "Invalid fields or query parameters");
            }
            if has_body {
                add("415", "The body is not sent as application/json");
            }
        }
    }
    for (path, param, ops) in [
        ("/api/v1/keys", "identifier", &key_ops),
        ("/api/v1/pools", "pool", &pool_ops),
    ] {
        let Some(RefOr::T(created)) = doc
            .paths
            .paths
            .get_mut(path)
            .and_then(|item| item.post.as_mut())
            .and_then(|op| op.responses.responses.get_mut("201"))
        else {
            continue;
        };
        for id in ops {
            created.links.insert(
                id.clone(),
                RefOr::T(
                    LinkBuilder::new()
                        .operation_id(id.clone())
                        .parameter(param, "$response.body#/identifier")
                        .build(),
                ),
            );
        }
    }
}

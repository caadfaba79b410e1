//! `GET` and `PUT /api/v1/users/:user_id/preferences` (API.md, "Preferences"): a user's muted types
//! and channels and quiet hours. A `PUT` is stored first, then the node's registry and shards follow
//! and, with a bus, the other nodes (`Fanout::preferences_changed`).

use super::notifications::{invalid_field, parse_body};
use super::{store_unavailable, ApiContext};
use crate::http::response::Response;
use crate::model::validate_user_id;
use crate::preferences::{Limits, Preferences, PreferencesInput};

/// `GET /api/v1/users/:user_id/preferences`: the stored preferences, or the defaults.
pub async fn get(ctx: &ApiContext<'_>, user_id: String) -> Response {
    if let Err(e) = validate_user_id(&user_id) {
        return invalid_field(&e);
    }
    match ctx.store.preferences(user_id.clone()).await {
        Ok(None) => answer(&user_id, &Preferences::default(), None),
        Ok(Some(stored)) => match Preferences::from_stored(&stored.json) {
            Ok(p) => answer(&user_id, &p, Some(stored.updated_at)),
            Err(e) => Response::error(503, "store_unavailable", &e),
        },
        Err(e) => store_unavailable(e),
    }
}

/// `PUT /api/v1/users/:user_id/preferences`: replaces the user's preferences with the body's (a
/// field left out takes its default; all defaults forget the user's row).
pub async fn put(ctx: &ApiContext<'_>, user_id: String, body: &mut [u8]) -> Response {
    if let Err(e) = validate_user_id(&user_id) {
        return invalid_field(&e);
    }
    let input: PreferencesInput = match parse_body(body, ctx.config.max_json_depth) {
        Ok(input) => input,
        Err(r) => return r,
    };
    let limits = Limits {
        max_muted_types: ctx.config.preferences_max_muted_types,
        max_muted_channels: ctx.config.preferences_max_muted_channels,
    };
    let preferences = match input.validate(limits) {
        Ok(p) => p,
        Err(e) => return invalid_field(&e),
    };
    let stored = (!preferences.is_default()).then(|| preferences.to_stored());
    match ctx
        .store
        .set_preferences(user_id.clone(), stored.clone())
        .await
    {
        Ok(at) => {
            let updated_at = stored.is_some().then_some(at);
            let response = answer(&user_id, &preferences, updated_at);
            let kept = stored.is_some().then_some(preferences);
            ctx.fanout
                .preferences_changed(&user_id, kept, stored, false);
            response
        }
        Err(e) => store_unavailable(e),
    }
}

fn answer(user_id: &str, preferences: &Preferences, updated_at: Option<i64>) -> Response {
    let mut body = Vec::with_capacity(160 + user_id.len());
    preferences.write_json(&mut body, user_id, updated_at);
    Response::json(200, body)
}

//! `ApiJson<T>`: a JSON body extractor whose every rejection is one of our problems.
//!
//! * wrong or missing `Content-Type` → 415
//! * body over the limit → 413
//! * not JSON at all, or trailing garbage → 400 `malformed_json`
//! * valid JSON of the wrong shape (types, missing, unknown or duplicate fields) → 422
//!   `validation_failed`, naming the field path

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::{AppError, FieldError};

pub struct ApiJson<T>(pub T);

fn is_json(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || (mime.len() > 5
            && mime[..mime.len() - 5].starts_with("application/")
            && mime.to_ascii_lowercase().ends_with("+json"))
}

/// Pulls a field name out of serde's messages such as "missing field `amount`".
fn quoted_field(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// Turns a body into `T`, classifying failures as the module doc says.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let err = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => {
            // Anything after the value (a second object, stray bytes) is malformed JSON.
            de.end()
                .map_err(|e| AppError::MalformedJson(e.to_string()))?;
            return Ok(v);
        }
        Err(err) => err,
    };
    let path = err.path().to_string();
    let inner = err.into_inner();
    use serde_json::error::Category;
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            Err(AppError::MalformedJson(inner.to_string()))
        }
        Category::Data => {
            // serde's text, without the " at line 1 column 9" suffix.
            let full = inner.to_string();
            let message = full.split(" at line ").next().unwrap_or(&full).to_owned();
            let field = if path == "." || path.is_empty() {
                // Missing, unknown and duplicate fields are reported on their parent.
                quoted_field(&message).unwrap_or("body").to_owned()
            } else if message.starts_with("missing field") {
                match quoted_field(&message) {
                    Some(f) => format!("{path}.{f}"),
                    None => path,
                }
            } else {
                path
            };
            Err(AppError::Invalid(vec![FieldError::new(field, message)]))
        }
    }
}

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(content_type) {
            return Err(AppError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(16 * 1024);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::PayloadTooLarge(limit)
            } else {
                AppError::MalformedJson("the request body could not be read".into())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The configured body limit, for the 413 message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("Application/JSON"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}

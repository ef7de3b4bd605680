//! `ApiJson<T>`: a JSON body extractor whose every rejection is one of our problems.
//!
//! * wrong or missing `Content-Type` → 415
//! * body over the limit → 413
//! * not JSON at all, or trailing garbage → 400 `malformed_json`
//! * valid JSON that is not an object (an array, a string, a number…) → 422
//!   `validation_failed` on `body`: serde would otherwise read an array as the fields in order
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

/// Turns a body into `T`, classifying failures as the module doc says. Every body of this
/// API is a JSON object.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => AppError::Invalid(vec![FieldError::new(
                    "body",
                    "must be a JSON object".to_owned(),
                )]),
                Err(e) => AppError::MalformedJson(e.to_string()),
            },
        );
    }
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

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Pair {
        a: String,
        b: i64,
    }

    fn invalid_field(result: Result<Pair, AppError>) -> Option<String> {
        match result {
            Err(AppError::Invalid(errors)) => Some(errors[0].field.clone()),
            _ => None,
        }
    }

    #[test]
    fn only_an_object_is_a_body() {
        assert!(parse_json::<Pair>(br#" {"a":"x","b":1}"#).is_ok());
        // serde alone would take an array as the fields in order.
        for not_an_object in [
            &br#"["x",1]"#[..],
            b"\n [\"x\", 1]",
            b"1",
            b"\"x\"",
            b"null",
            b"true",
        ] {
            assert_eq!(
                invalid_field(parse_json::<Pair>(not_an_object)).as_deref(),
                Some("body"),
                "{}",
                String::from_utf8_lossy(not_an_object)
            );
        }
        for malformed in [&b""[..], b"   ", b"[1,", b"nul", b"\xef\xbb\xbf{}"] {
            assert!(
                matches!(
                    parse_json::<Pair>(malformed),
                    Err(AppError::MalformedJson(_))
                ),
                "{}",
                String::from_utf8_lossy(malformed)
            );
        }
    }

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

//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gptoss_engine::engine::EngineError;
use gptoss_engine::sampling::SamplingError;
use serde::Serialize;

/// An error returned to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, `server_error`...).
    pub kind: &'static str,
    /// The request parameter at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<String>,
}

/// The JSON body of an error.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The error.
    pub error: ErrorDetail<'a>,
}

/// The `error` object.
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    /// Human-readable message.
    pub message: &'a str,
    /// Error type.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// Offending parameter.
    pub param: Option<&'a str>,
    /// Code.
    pub code: Option<&'a str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: code.map(str::to_string),
        }
    }

    /// A 400 about parameter `param`.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message, Some(param), Some("invalid_value"))
    }

    /// A 404 for an unknown model.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }
    }

    /// A 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    /// A 404 for an unknown route.
    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown request URL: {path}."),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url".into()),
        }
    }

    /// A 413 for an oversized body.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than the limit of {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large".into()),
        }
    }

    /// A 503 (shutting down, engine gone).
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable".into()),
        }
    }

    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("internal_error".into()),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        })
        .expect("error serialises")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<SamplingError> for ApiError {
    fn from(e: SamplingError) -> Self {
        match e {
            SamplingError::InvalidParameter {
                param,
                code,
                message,
            } => ApiError::invalid(message, Some(param), Some(code)),
            other => ApiError::invalid(other.to_string(), None, None),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest { param, message } => {
                ApiError::invalid(message, Some(param), Some("invalid_value"))
            }
            EngineError::NotRunning => ApiError::unavailable("The server is shutting down."),
            EngineError::Config(m) => ApiError::internal(m),
        }
    }
}

/// Parses a JSON request body into `T`, naming the offending field on type errors.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means you \
                 aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) \
                 Details: {e}"
            ),
            None,
            Some("invalid_json"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
            Some("invalid_json"),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let param = if path == "." || path.is_empty() {
            // Missing fields are reported at the level that lacks them.
            inner
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
                .unwrap_or("")
                .to_string()
        } else {
            path
        };
        let message = if param.is_empty() {
            format!("Invalid request: {inner}")
        } else {
            format!("Invalid type or value for '{param}': {inner}")
        };
        let code = if inner.starts_with("missing field") {
            "missing_required_parameter"
        } else {
            "invalid_type"
        };
        ApiError::invalid(
            message,
            (!param.is_empty()).then_some(param.as_str()),
            Some(code),
        )
    })
}
